"""Resuming from a checkpoint continues exactly: same losses and bit-identical final weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import TINY, losses, run_distributed, train

RUN = TINY + ["train.max_steps=8", "checkpoint.interval=4", "checkpoint.keep_last=0", "parallel.zero_stage=1"]


def _train(run_dir: str) -> list[dict]:
    records, _ = train(RUN, run_dir)
    return records


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("model-*.safetensors")) + sorted(ckpt.glob("optim-*.safetensors")):
        out.update(load_file(f))
    return out


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    uninterrupted = run_distributed(_train, 2, str(full))[0]
    assert [r["step"] for r in uninterrupted] == list(range(1, 9))

    # A run that stopped right after its step-4 checkpoint: only that checkpoint exists.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    continued = run_distributed(_train, 2, str(resumed))[0]

    assert [r["step"] for r in continued] == [5, 6, 7, 8]
    assert losses(continued) == losses(uninterrupted)[4:]  # exact float equality, not a tolerance
    a = _weights(full / "checkpoints" / "step_00000008")
    b = _weights(resumed / "checkpoints" / "step_00000008")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def _fresh_start(overrides: list[str], run_dir: str) -> str:
    """'ok' after training, or the one-line error that stopped it."""
    from pretrain.config import ConfigError

    try:
        train(overrides, run_dir)
    except ConfigError as err:
        return str(err)
    return "ok"


def test_a_fresh_start_keeps_off_another_runs_history(tmp_path: Path) -> None:
    """No checkpoint to resume: the same run restarting starts over (its metrics are redone), but a
    different run pointed at the directory is refused before it erases the first one's metrics."""
    first = TINY + ["train.max_steps=3", "train.log_interval=1", "checkpoint.save_final=false"]
    run_dir = str(tmp_path / "run")
    assert run_distributed(_fresh_start, 1, first, run_dir)[0] == "ok"
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    other = run_distributed(_fresh_start, 1, first + ["model.hidden_size=128"], run_dir)[0]
    assert other.startswith(f"config error: run.dir {run_dir} holds the metrics of another run with no checkpoint "
                            "to resume (model.hidden_size=64 (now 128))"), other
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert run_distributed(_fresh_start, 1, first + ["model.hidden_size=128", "checkpoint.resume=false"],
                           run_dir)[0] == "ok"  # told to start over
    assert run_distributed(_fresh_start, 1, first + ["model.hidden_size=128"], run_dir)[0] == "ok"  # its restart


def test_starting_over_never_overwrites_checkpoints(tmp_path: Path) -> None:
    run = TINY + ["train.max_steps=2"]
    run_dir = str(tmp_path / "run")
    assert run_distributed(_fresh_start, 1, run, run_dir)[0] == "ok"  # saves step 2 at its end
    saved = (tmp_path / "run" / "checkpoints" / "step_00000002" / "manifest.json").read_bytes()
    refused = run_distributed(_fresh_start, 1, run + ["checkpoint.resume=false"], run_dir)[0]
    assert refused == (f"config error: checkpoint.resume=false but {run_dir}/checkpoints holds checkpoints "
                       "(step_00000002); starting over would overwrite them: use another run.dir, or delete them first")
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "manifest.json").read_bytes() == saved
