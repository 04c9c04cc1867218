"""Everyday use of a finished run: what the console shows, and the tools that read a checkpoint.

One real two-process run (`python -m launch`, ZeRO-1, a tiny model on the embedded corpus) is
shared by every test here: its console output, tools/evaluate.py against its in-run eval,
tools/generate.py against transformers' generate on its Hugging Face export, tools/plot.py.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import HUNG
from pretrain.compiling import inductor_builds_cpu_kernels

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "model.vocab_size=1024", "data.embedded_vocab_size=1024", "train.seq_len=32", "train.micro_batch_size=2",
         "train.max_steps=6", "train.eval_interval=3", "train.log_interval=2", "optim.lr=3e-3",
         "optim.warmup_steps=2", "logging.wandb=disabled", "train.sample_tokens=8", "checkpoint.interval=0"]


def tool(name: str, *args: str, timeout: int = HUNG) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("everyday") / "run"
    proc = subprocess.run([sys.executable, "-m", "launch", *SMALL, f"run.dir={run_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=HUNG)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_console_shows_startup_block_progress_eval_and_sample_once(run) -> None:
    run_dir, proc = run
    out = proc.stdout
    # library start-up chatter is silenced at its source, on every rank
    for noise in ("Transformer Engine and Apex", "built successfully", "UserWarning"):
        assert noise not in out + proc.stderr
    block = out[out.index(f"run {run_dir}"):].splitlines()[:8]
    keys = [line.split()[0] for line in block[1:]]
    assert keys == ["model", "layout", "batch", "data", "precision", "start", "outputs"]
    assert "0.2M parameters" in block[1] and "2 layers, hidden 64" in block[1]
    assert "tp 1 x dp 2 | ZeRO-1" in block[2]
    assert "128 tokens/step = 2 seqs x 32 tokens x dp 2 x accum 1 | 6 steps = 768 tokens" in block[3]
    assert re.search(r"train [\d,]+ tokens \(\d+ shards\), val [\d,]+ tokens", block[4])
    assert "fp32 | attention sdpa" in block[5] and "fresh weights" in block[6]
    assert ("compiled blocks" if inductor_builds_cpu_kernels() else "eager blocks") in block[5]
    # stdout is a pipe: plain lines at log_interval (plus the first step), from rank 0 only
    steps = [int(m.group(1)) for m in re.finditer(r"^step +(\d+)/6 \| loss", out, re.M)]
    assert steps == [1, 2, 4, 6]
    # the first step's line has no ETA yet (that step compiles); later ones count from it
    assert re.search(r"^step +1/6 \| loss [\d.]+ \| lr [\d.e+-]+ \| grad_norm [\d.]+ \| [\d,]+ tok/s \| "
                     r"MFU [\d.]+% \| ETA \?$", out, re.M)
    assert re.search(r"^step +4/6 \| loss .* \| ETA \d+:\d\d:\d\d$", out, re.M)
    evals = re.findall(r"^step +(\d)/6 \| eval_loss ([\d.]+) \| eval ([\d.]+) bits/byte", out, re.M)
    assert [e[0] for e in evals] == ["3", "6"]
    logged = [r for r in records(run_dir) if "eval_loss" in r]
    assert [round(r["eval_loss"], 4) for r in logged] == [float(e[1]) for e in evals]
    assert all(0 < r["eval_bpb"] < r["eval_loss"] * 3 for r in logged)
    assert out.count("greedy sample after 6 steps, prompt 'def '") == 1
    assert out.count(f"run {run_dir}") == 1


def test_evaluate_reproduces_the_runs_eval_loss(run) -> None:
    run_dir, _ = run
    result = tool("evaluate.py", run_dir, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    final = [r for r in records(run_dir) if "eval_loss" in r][-1]
    # Same batches, same forward; only the thread count differs from the run's workers, which
    # can change float summation order, hence a tolerance rather than equality.
    assert got["step"] == 6 and got["dp"] == 2 and got["split"] == "val"
    assert got["tokens"] == 2 * 4 * 2 * 32  # dp x eval_batches x micro_batch x seq_len
    assert abs(got["loss"] - final["eval_loss"]) < 1e-5
    assert abs(got["bits_per_byte"] - final["eval_bpb"]) < 1e-5
    assert abs(got["perplexity"] - math.exp(got["loss"])) < 1e-6 * got["perplexity"]


def test_evaluate_scores_every_token_of_raw_text(run, tmp_path) -> None:
    from pretrain.data import load_tokenizer

    run_dir, _ = run
    text = "def add(a, b):\n    return a + b\n" * 40
    (tmp_path / "a.py").write_text(text)
    result = tool("evaluate.py", run_dir, "--data", tmp_path / "a.py", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    data_dir = json.loads((run_dir / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    ids = load_tokenizer(data_dir["tokenizer"]["dataset_dir"]).encode(text).ids
    first = load_tokenizer(data_dir["tokenizer"]["dataset_dir"]).decode(ids[:1])
    assert got["tokens"] == len(ids)  # every token after the first, plus the closing <|endoftext|>
    assert got["bytes"] == len(text.encode()) - len(first.encode())
    assert 0 < got["bits_per_byte"] and got["loss"] > 0


def test_plot_draws_curves_of_real_runs_overlaid(run, tmp_path) -> None:
    from matplotlib.image import imread

    run_dir, _ = run
    out = tmp_path / "curves.png"
    result = tool("plot.py", run_dir, run_dir / "metrics.jsonl", "--labels", "first", "second", "--out", out)
    assert result.returncode == 0, result.stderr
    image = imread(str(out))
    # five rows (loss, eval bits/byte, lr, tokens/s, MFU) of two columns (steps, tokens)
    assert image.shape[0] > image.shape[1] and image.shape[0] >= 1500
    assert image[..., :3].std() > 0.05  # not a blank canvas


def _greedy_ids(*args: str) -> list[int]:
    result = tool("generate.py", *args, "--ids", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stdout.splitlines() if l.startswith("ids: ")][-1]
    return [int(t) for t in line[5:].split()]


def test_generate_greedy_matches_transformers_on_the_export(run, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = run
    hf = tmp_path / "hf"
    assert tool("convert_checkpoint.py", "to-hf", run_dir, hf).returncode == 0
    ours = _greedy_ids(str(run_dir), "--prompt", "import os\n", "--max-new-tokens", "24")
    from_export = _greedy_ids(str(hf), "--prompt", "import os\n", "--max-new-tokens", "24")
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    prompt = [tokenizer.eos_token_id] + tokenizer("import os\n")["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             pad_token_id=tokenizer.eos_token_id)
    theirs = out[0, len(prompt):].tolist()
    assert len(ours) >= 1 and ours == theirs == from_export


def test_a_wrong_tokenizer_path_or_metric_is_named_not_ignored(run, tmp_path) -> None:
    run_dir, _ = run
    for name, args, expected in [
            ("generate.py", [run_dir, "--tokenizer", tmp_path / "nowhere", "--prompt", "x"],
             f"{tmp_path / 'nowhere'}: tokenizer file not found"),
            ("plot.py", [run_dir, "--metric", "nosuch", "--out", tmp_path / "p.png"],
             "--metric nosuch: no record has it; the runs log "),
    ]:
        result = tool(name, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "p.png").exists()


def test_generate_sampling_is_reproducible_with_a_seed(run) -> None:
    run_dir, _ = run
    args = [str(run_dir), "--prompt", "class", "--max-new-tokens", "12", "--temperature", "1.0", "--top-p", "0.9"]
    first = _greedy_ids(*args, "--seed", "7")
    assert first == _greedy_ids(*args, "--seed", "7")
    greedy = _greedy_ids(str(run_dir), "--prompt", "class", "--max-new-tokens", "12")
    assert _greedy_ids(*args[:-2], "--top-k", "1", "--seed", "3") == greedy  # top-1 sampling is greedy


def test_top_k_and_top_p_keep_the_likeliest_tokens() -> None:
    from pretrain.generate import filter_logits, next_token

    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = lambda out: torch.isfinite(out).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 2]
    assert kept(filter_logits(logits, top_p=0.5)) == [0]
    assert kept(filter_logits(logits, top_p=0.8)) == [0, 2]  # 0.5 + 0.3 reaches 0.8
    assert kept(filter_logits(logits, top_p=0.81)) == [0, 2, 3]
    assert next_token(logits).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = [next_token(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)]
    assert set(draws) == {0, 2} and 0.25 < draws.count(2) / 200 < 0.5  # 0.3/0.8 = 0.375 expected, sd 0.034


def test_progress_bar_on_a_terminal_shows_step_loss_lr_speed_mfu_and_eta() -> None:
    from pretrain.console import Progress

    screen = io.StringIO()
    progress = Progress(max_steps=20, start_step=0, log_interval=5, enabled=True, stream=screen, live=True)
    for step in range(1, 13):
        progress.update(step, {"step": step, "loss": 9.0 - step * 0.1, "lr": 1e-3, "tokens_per_sec": 4321.0,
                               "mfu": 0.123, "grad_norm": 1.0} if step % 4 == 0 else None)
    progress.write("step     12/20 | eval_loss 7.0000")
    progress._bar.refresh()
    progress.close()
    text = screen.getvalue()
    assert "\r" in text  # redrawn in place, not one line per step
    last = text.split("\r")[-1]
    assert "12/20" in last and "loss 7.800" in last and "lr 1.0e-03" in last
    assert "4,321 tok/s" in last and "MFU 12.3%" in last and re.search(r"\[\d\d:\d\d<\d\d:\d\d", last)
    assert "eval_loss 7.0000\n" in text


def test_eta_counts_from_the_end_of_the_first_step() -> None:
    """A first step that compiles for 100 s, then 1 s a step: after step 5 of 20 the 15 steps left
    take 15 s, where an average over all steps would say 312 s."""
    from pretrain.console import Progress

    now = [0.0]
    out = io.StringIO()
    progress = Progress(max_steps=20, start_step=0, log_interval=5, enabled=True, stream=out, clock=lambda: now[0])
    for step in range(1, 6):
        now[0] += 100.0 if step == 1 else 1.0
        progress.update(step, {"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_sec": 10.0, "mfu": 0.5,
                               "grad_norm": 1.0})
    first, fifth = out.getvalue().splitlines()
    assert first.endswith("ETA ?") and fifth.endswith("ETA 0:00:15")


def test_progress_without_a_terminal_prints_plain_lines_at_the_log_interval() -> None:
    from pretrain.console import Progress

    out = io.StringIO()
    progress = Progress(max_steps=12, start_step=0, log_interval=5, enabled=True, stream=out)
    for step in range(1, 13):
        progress.update(step, {"step": step, "loss": 2.0, "lr": 1e-3, "tokens_per_sec": 10.0, "mfu": 0.5,
                               "grad_norm": 1.0})
    assert [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()] == [1, 5, 10, 12]
    silent = io.StringIO()
    Progress(max_steps=12, start_step=0, log_interval=5, enabled=False, stream=silent).update(5, {"loss": 1.0})
    assert silent.getvalue() == ""



def _train_with_wandb(run_dir: str, steps: int) -> str:
    from helpers import TINY, train

    overrides = [o for o in TINY if not o.startswith("logging.")] + ["logging.wandb=offline",
                                                                      f"train.max_steps={steps}"]
    train(overrides, run_dir)
    return (Path(run_dir) / "wandb_id").read_text().strip()


def test_wandb_resumed_run_continues_the_same_run_with_config_and_system_stats(tmp_path, monkeypatch) -> None:
    from helpers import run_distributed

    monkeypatch.setenv("WANDB_X_STATS_SAMPLING_INTERVAL", "0.5")  # inherited by the spawned workers
    run_dir = str(tmp_path / "run")
    [first] = run_distributed(_train_with_wandb, 1, run_dir, 2)
    [again] = run_distributed(_train_with_wandb, 1, run_dir, 4)  # resumes from step 2
    assert first == again
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{first}") for r in runs)
    # offline runs keep their records in the run's .wandb log (protobuf); its strings are readable
    log = (runs[-1] / f"run-{first}.wandb").read_bytes()
    assert b'"hidden_size":64' in log.replace(b" ", b"")  # the resolved config ...
    assert b"tokens_per_step" in log and b'"wandb":"offline"' in log.replace(b" ", b"")
    assert b"proc.memory.rssMB" in log  # ... and system stats
    assert b"tokens_per_sec" in log and b"grad_norm" in log  # the step metrics
