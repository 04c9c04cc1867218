"""Recovery from damage: a corrupt `latest` falls back to the newest verified checkpoint with one
warning and ends where a deliberate resume from that checkpoint ends; keep_last never deletes the
last verified checkpoint; a hung rank is detected, its stacks name the sleeping frame, the job
exits non-zero; a worker killed with SIGKILL under `python -m launch` restarts and ends bit-identical
to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import HUNG, TINY, run_distributed

REPO = Path(__file__).resolve().parent.parent
RUN = TINY + ["parallel.zero_stage=1", "checkpoint.interval=2", "checkpoint.keep_last=0"]


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Weights and Adam moments of a checkpoint, by name."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("model-*.safetensors")) + sorted(ckpt.glob("optim-*.safetensors")):
        out.update(load_file(f))
    return out


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _runs(base: str, damaged: str, deliberate: str) -> None:
    from megatron.core import parallel_state

    from pretrain.config import compose
    from pretrain.train import build

    for run_dir, steps in ((base, 4), (damaged, 6), (deliberate, 6)):
        if run_dir != base:  # the two continuations start from copies of the base run
            shutil.copytree(base, run_dir)
            ckpts = Path(run_dir) / "checkpoints"
            if run_dir == damaged:
                model, optim = ckpts / "step_00000004" / "model-00000-of-00001.safetensors", \
                    ckpts / "step_00000004" / "optim-00000-of-00001.safetensors"
                os.truncate(model, model.stat().st_size // 2)
                data = bytearray(optim.read_bytes())
                data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
                optim.write_bytes(bytes(data))
            else:
                shutil.rmtree(ckpts / "step_00000004")
                (ckpts / "latest").write_text("step_00000002\n")
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        build(compose([*RUN, f"train.max_steps={steps}", f"run.dir={run_dir}"], world_size=1)).run()


def test_corrupt_latest_falls_back_to_the_previous_checkpoint(tmp_path: Path, capfd) -> None:
    base, damaged, deliberate = (str(tmp_path / n) for n in ("base", "damaged", "deliberate"))
    run_distributed(_runs, 1, base, damaged, deliberate)
    out = capfd.readouterr().out
    warnings = [l for l in out.splitlines() if l.startswith("warning: resuming from")]
    assert len(warnings) == 1, out
    assert f"{damaged}/checkpoints/step_00000002 instead of the newest checkpoint" in warnings[0]
    assert f"{damaged}/checkpoints/step_00000004/model-00000-of-00001.safetensors: checksum mismatch" in warnings[0]
    a = _state(Path(damaged) / "checkpoints" / "step_00000006")
    b = _state(Path(deliberate) / "checkpoints" / "step_00000006")
    assert _max_difference(a, b) == 0.0 and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (Path(damaged) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the damaged history appear once, as redone


def test_keep_last_never_deletes_the_last_verified_checkpoint(tmp_path: Path) -> None:
    from pretrain.checkpoint.format import file_record, prune, write_json_atomic

    for step in (1, 2, 3):
        ckpt = tmp_path / f"step_{step:08d}"
        ckpt.mkdir()
        (ckpt / "model.safetensors").write_bytes(bytes([step]) * 64)
        write_json_atomic(ckpt / "manifest.json", {"format_version": 1, "step": step, "model": {}, "tensors": {},
                                                   "layout": {}, "files": {"model.safetensors":
                                                                           file_record(ckpt / "model.safetensors")}})
    (tmp_path / "latest").write_text("step_00000003\n")
    (tmp_path / "step_00000003" / "model.safetensors").write_bytes(b"\0" * 64)  # damaged after writing
    prune(tmp_path, keep_last=1)
    # step 3 is kept (latest), step 2 too: the newest that verifies; only step 1 goes.
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    (tmp_path / "step_00000004").mkdir()
    shutil.copy(tmp_path / "step_00000002" / "model.safetensors", tmp_path / "step_00000004")
    manifest = json.loads((tmp_path / "step_00000002" / "manifest.json").read_text())
    write_json_atomic(tmp_path / "step_00000004" / "manifest.json", dict(manifest, step=4))
    (tmp_path / "latest").write_text("step_00000004\n")
    prune(tmp_path, keep_last=1)  # the newest verifies now: the older ones may go
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004"]


def _resume_past_a_damaged_checkpoint(run_dir: str) -> None:
    from megatron.core import parallel_state

    from pretrain.config import compose
    from pretrain.train import build

    keep2 = [*TINY, "parallel.zero_stage=1", "checkpoint.keep_last=2", f"run.dir={run_dir}"]
    build(compose([*keep2, "checkpoint.interval=2", "train.max_steps=6"], world_size=1)).run()
    optim = Path(run_dir) / "checkpoints" / "step_00000006" / "optim-00000-of-00001.safetensors"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optim.write_bytes(bytes(data))
    parallel_state.destroy_model_parallel()
    # resumes from step 4 past the damaged step 6, then saves at step 5 (a step the damage never had)
    build(compose([*keep2, "checkpoint.interval=5", "train.max_steps=5"], world_size=1)).run()


def test_keep_last_counts_only_checkpoints_that_verify_after_a_resume_passed_one_over(tmp_path: Path, capfd) -> None:
    run_dir = tmp_path / "run"
    run_distributed(_resume_past_a_damaged_checkpoint, 1, str(run_dir))
    assert "warning: resuming from" in capfd.readouterr().out
    ckpts = run_dir / "checkpoints"
    # keep_last=2 keeps two good ones (4 and 5); the damaged step 6 stays, untouched, for inspection
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000005", "step_00000006"]
    assert (ckpts / "latest").read_text().strip() == "step_00000005"


def _launch(run_dir: Path, *overrides: str, timeout: float = HUNG) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "launch", *TINY, "launcher.nproc_per_node=2",
                           f"run.dir={run_dir}", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_hung_rank_is_detected_and_the_job_exits_nonzero(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _launch(run_dir, "train.max_steps=50", "train.hang_timeout=20", "faults.hang_step=3",
                     "faults.rank=1", "faults.hang_seconds=3600")
    assert result.returncode != 0, result.stderr[-2000:]
    stacks = (run_dir / "hang-rank1.txt").read_text()
    assert "rank 1: no progress for" in stacks and "after step 2" in stacks
    assert 'in sleep_inside_step' in stacks and "faults.py" in stacks, stacks
    assert "hang detected" in result.stderr
    # Rank 0 waited in a collective for rank 1 and reported too: whichever watchdog fires first waits
    # watchdog.EXIT_GRACE seconds before exiting, since the launcher then kills the other worker.
    assert (run_dir / "hang-rank0.txt").read_text().startswith("rank 0: no progress for"), result.stderr[-2000:]


def test_killed_worker_restarts_and_ends_bit_identical(tmp_path: Path) -> None:
    steps, interval = 12, 4
    kill_step = random.Random().randint(interval + 1, steps - 1)  # after the first checkpoint
    common = [f"train.max_steps={steps}", f"checkpoint.interval={interval}", "checkpoint.keep_last=0",
              "launcher.max_restarts=1"]
    whole = _launch(tmp_path / "whole", *common)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _launch(tmp_path / "killed", *common, f"faults.kill_step={kill_step}", "faults.rank=1")
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "resuming from" in killed.stdout, (kill_step, killed.stdout[-3000:])
    a = _state(tmp_path / "whole" / "checkpoints" / f"step_{steps:08d}")
    b = _state(tmp_path / "killed" / "checkpoints" / f"step_{steps:08d}")
    difference = _max_difference(a, b)
    print(f"killed at step {kill_step}; max |difference| over {len(a)} weight and moment tensors "
          f"after step {steps}: {difference}")
    assert difference == 0.0 and all(torch.equal(a[k], b[k]) for k in a), kill_step
    records = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1)), kill_step
