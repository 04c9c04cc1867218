"""README.md stays true: its walkthrough and its quick start run as written (with fewer steps)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HUNG

REPO = Path(__file__).resolve().parent.parent
# Appended to every `python -m launch` line: Hydra lets the last value of a key win.
SHORT = ["train.max_steps=4", "train.eval_interval=2", "train.log_interval=1", "train.sample_tokens=8",
         "logging.wandb=disabled"]


def bash_block(heading: str) -> str:
    """The first ```bash block under the README section whose heading starts with `heading`."""
    text = (REPO / "README.md").read_text()
    section = re.search(rf"^## {re.escape(heading)}.*?(?=^## |\Z)", text, re.M | re.S)
    assert section, f"README.md has no section '## {heading}'"
    block = re.search(r"```bash\n(.*?)```", section.group(0), re.S)
    assert block, f"README.md section '{heading}' has no bash block"
    return block.group(1)


def shorten(command: str) -> str:
    """The same command with a few steps instead of hundreds, when it starts a training run."""
    if re.match(r"\s*python -m launch\b", command):
        return command.rstrip() + " " + " ".join(SHORT)
    return command


def shell_env() -> dict[str, str]:
    """`python` is this interpreter (the project's environment), and the checkout is importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


@pytest.mark.slow
def test_walkthrough_from_own_corpus_to_hugging_face_runs_as_written(tmp_path: Path) -> None:
    block = bash_block("From your own corpus to a Hugging Face model")
    lines = [shorten(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]
    called = [re.search(r"tools/(\w+)\.py", l).group(1) for l in lines if "tools/" in l]
    assert called == ["train_tokenizer", "prepare_data", "plot", "generate", "evaluate", "evaluate",
                      "convert_checkpoint"]
    assert any(l.startswith("python -m launch") for l in lines)
    (tmp_path / "tools").symlink_to(REPO / "tools")  # the commands run from a checkout's root
    script = "set -euo pipefail\n" + "\n".join(f"echo '+ {i}'\n{line}" for i, line in enumerate(lines))
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=shell_env(), capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    work = tmp_path / "work"
    assert (work / "tok" / "tokenizer.json").is_file() and (work / "data" / "manifest.json").is_file()
    assert (work / "run" / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    assert (work / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "hf" / "config.json").is_file() and (work / "hf" / "tokenizer.json").is_file()
    out = proc.stdout
    assert "greedy sample after 4 steps" in out
    assert re.search(r"^async def fetch\(", out, re.M)  # generate.py echoes the prompt and continues it
    evals = [json.loads(l) for l in (work / "run" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert re.search(rf"^loss {evals[-1]['eval_loss']:.4f} nats/token \| perplexity", out, re.M)
    as_json = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    assert as_json["bits_per_byte"] > 0 and as_json["tokens"] > 1000


def test_quick_start_trains_the_default_job(tmp_path: Path) -> None:
    block = bash_block("Quick start")
    first = block.strip().splitlines()[0]
    command = first.split("&&")[-1].strip()  # what follows the install
    assert command == "python -m launch"
    proc = subprocess.run(["bash", "-c", shorten(command) + f" run.dir={tmp_path}/run"], cwd=REPO, env=shell_env(),
                          capture_output=True, text=True, timeout=HUNG)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ZeRO-1" in proc.stdout and "greedy sample after 4 steps, prompt 'def '" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
