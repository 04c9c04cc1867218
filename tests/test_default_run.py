"""The README's default job, end to end: `python -m launch` with a short max_steps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_default_launch_trains_logs_and_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "launch", "train.max_steps=40", "train.eval_interval=20",
                           "checkpoint.interval=20", "logging.wandb=disabled", f"run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plan: 1 node(s) x 2 process(es)" in proc.stdout
    assert "ZeRO-1" in proc.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= r.keys()
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 and math.isfinite(r["grad_norm"])
    assert [r["step"] for r in evals] == [20, 40]
    # Starts near ln(vocab) = ln(8192) ~ 9.0 and clearly falls.
    assert abs(steps[0]["loss"] - math.log(8192)) < 0.5
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000040"
    manifest = json.loads((ckpts / "step_00000040" / "manifest.json").read_text())
    assert manifest["step"] == 40 and manifest["layout"]["world_size"] == 2
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 40 and config["parallel"]["zero_stage"] == 1


def test_restarting_a_finished_run_resumes_and_says_so(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "launch", "train.max_steps=3", "train.eval_interval=0", "logging.wandb=disabled",
            "model.vocab_size=1024", "data.embedded_vocab_size=1024", f"run.dir={run_dir}"]
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(args[:3] + ["train.max_steps=5"] + args[4:], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step_00000003" in again.stdout
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
