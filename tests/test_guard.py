"""The loss guard: a poisoned or spiking step is skipped on every rank with weights, Adam moments
and Adam's step count untouched, counted in the metrics; a streak of bad steps rolls the run back
to its last checkpoint and the run still completes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import TINY, run_distributed

BASE = TINY + ["parallel.zero_stage=1", "train.guard.min_history=2", "train.guard.window=4"]


class PoisonSteps:
    """A FaultHook (pretrain.faults): NaN loss on one rank at one step, a 1000x loss spike on every
    rank at another; snapshots the optimizer's full state right before each optimizer step."""

    def __init__(self, rank: int, nan_step: int, nan_rank: int, spike_step: int) -> None:
        self.rank, self.nan_step, self.nan_rank, self.spike_step = rank, nan_step, nan_rank, spike_step
        self.engine = None
        self.before: dict[int, dict[str, torch.Tensor]] = {}

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == self.nan_step and self.rank == self.nan_rank:
            return loss * float("nan")
        return loss * 1000.0 if step == self.spike_step else loss

    def gradients(self, step: int, model: torch.nn.Module) -> None:
        from pretrain.checkpoint.state import get_moment, get_param, optimizer_step

        state = {"adam_step": torch.tensor(optimizer_step(self.engine))}
        for name, param in model.named_parameters():
            state[name] = get_param(self.engine, param).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{name}.{key}"] = get_moment(self.engine, param, key).clone()
        self.before[step] = state

    def inside_step(self, step: int) -> None:
        pass


def _skip_run(run_dir: str) -> dict:
    import os

    from pretrain.config import compose
    from pretrain.train import build

    cfg = compose([*BASE, "train.max_steps=8", f"run.dir={run_dir}"], world_size=2)
    hook = PoisonSteps(int(os.environ["RANK"]), nan_step=3, nan_rank=1, spike_step=6)
    trainer = build(cfg, faults=hook)
    hook.engine = trainer.engine
    records = trainer.run()
    unchanged = {step: all(torch.equal(hook.before[step][k], hook.before[step + 1][k]) for k in hook.before[step])
                 for step in (3, 6)}
    changed = {step: not torch.equal(hook.before[step]["adam_step"], hook.before[step + 1]["adam_step"])
               for step in (2, 4)}
    return {"records": records, "unchanged": unchanged, "changed": changed,
            "adam_steps": int(hook.before[8]["adam_step"])}


def test_nan_and_spike_steps_are_skipped_on_every_rank(tmp_path: Path) -> None:
    results = run_distributed(_skip_run, 2, str(tmp_path))
    for rank, result in enumerate(results):
        # The optimizer state right before step 4 equals the one before step 3: step 3 changed nothing.
        assert result["unchanged"] == {3: True, 6: True}, rank
        assert result["changed"] == {2: True, 4: True}, rank  # good steps do move Adam's step count
        assert result["adam_steps"] == 5  # 7 steps done before step 8's update, 2 of them skipped
    records = results[0]["records"]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert math.isnan(records[2]["loss"]) and records[5]["loss"] > 100 * records[4]["loss"]
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i not in (2, 5))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9)) and lines[-1]["skipped_steps"] == 2


def _rollback_run(run_dir: str, overrides: list[str]) -> list[dict]:
    from pretrain.config import compose
    from pretrain.train import build

    cfg = compose([*BASE, *overrides, f"run.dir={run_dir}"], world_size=2)
    return build(cfg).run()


def test_repeated_nan_rolls_back_and_the_run_completes(tmp_path: Path, capfd) -> None:
    overrides = ["train.max_steps=8", "checkpoint.interval=2", "checkpoint.keep_last=0",
                 "faults.nan_steps=[5,6,7]", "train.guard.max_bad_steps=3"]
    records = run_distributed(_rollback_run, 2, str(tmp_path), overrides)[0]
    out = capfd.readouterr().out
    assert "step 5 skipped (non-finite loss" in out and "rolled back from step 7 to" in out
    assert "step_00000004 (step 4)" in out, out
    # Steps 5-7 ran twice: poisoned, then (after the rollback) on the next batches, finite.
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["skipped_steps"] == 3
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))  # each step once, as the run went on
    manifest = json.loads((tmp_path / "checkpoints" / "step_00000008" / "manifest.json").read_text())
    assert manifest["optimizer_step"] == 8 and manifest["guard"]["skipped"] == 3


def test_nan_gradients_with_finite_loss_are_skipped(tmp_path: Path) -> None:
    overrides = ["parallel.zero_stage=0", "train.max_steps=4", "faults.nan_grad_steps=[3]"]
    records = run_distributed(_rollback_run, 2, str(tmp_path), overrides)[0]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
    assert math.isfinite(records[2]["loss"]) and math.isnan(records[2]["grad_norm"])
    assert math.isfinite(records[3]["loss"]) and math.isfinite(records[3]["grad_norm"])


def _decide_without_sync() -> dict:
    import torch.distributed as dist

    from pretrain.config import GuardConfig
    from pretrain.guard import StepGuard

    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    device = torch.device("cuda", 0)
    guard = StepGuard(GuardConfig(min_history=2, window=4), device)
    param = torch.nn.Parameter(torch.ones(64, device=device))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    snapshots = []
    # The losses reach the device before the checked region: copying a Python number there syncs.
    losses = torch.tensor([2.0, 1.9, 1.8, float("nan"), 1.7], device=device)
    for step, loss in enumerate(losses):
        param.grad = torch.full_like(param, 0.5)
        torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
        bad = guard.judge(loss, 1, param.grad.norm())
        guard.gate(optimizer, bad)
        optimizer.step()
        torch.cuda.set_sync_debug_mode(0)
        snapshots.append((param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()}))
    verdict = guard.read()
    before, after = snapshots[2], snapshots[3]
    untouched = torch.equal(before[0], after[0]) and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    return {"untouched": untouched, "skipped": verdict.skipped_steps, "adam_step": float(snapshots[-1][1]["step"])}


@pytest.mark.gpu
def test_guard_decides_on_the_gpu_without_a_host_sync() -> None:
    result = run_distributed(_decide_without_sync, 1)[0]
    assert result == {"untouched": True, "skipped": 1, "adam_step": 4.0}
