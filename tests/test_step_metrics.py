"""Per-step metrics are kept on the device and read once per flush, with the values a per-step read
would give: every step's own loss, gradient norm, learning rate and guard verdict, in step order."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from helpers import TINY


def test_metrics_are_read_once_per_interval_with_every_steps_values() -> None:
    from pretrain.step_metrics import StepMetrics

    metrics = StepMetrics(tokens_per_step=64, flops_per_token=10.0, peak_flops=1e6)
    engine_norm = torch.zeros(())  # an engine that reuses one tensor for its reported norm
    flushes = []
    for i in range(5):
        step = i + 1
        metrics.step_started()
        # [loss, norm, bad, spike, streak, skipped] as StepGuard.judge leaves it
        row = torch.tensor([4.0 - i, float("nan"), float(step == 3), 0.0, float(step == 3), float(step >= 3)])
        if step % 2:  # the engine reports the norm after its step: it replaces the row's NaN
            engine_norm.fill_(0.5 * step)
            norm = engine_norm if step != 5 else 2.5  # a tensor, or a float
        else:
            row[1], norm = 0.5 * step, None  # the norm computed before the step is in the row
        metrics.add(step, row, norm, lr=1e-3 * step, consumed_tokens=64 * step)
        engine_norm.fill_(-1.0)  # reused next step: the kept value must not change
        if step % 3 == 0 or step == 5:
            assert metrics.pending == (3 if step == 3 else 2)
            flushes.append(metrics.flush())
    assert metrics.flush() == [] and metrics.pending == 0  # nothing pending: nothing written
    assert [[r["step"] for r, _ in f] for f in flushes] == [[1, 2, 3], [4, 5]]  # one record per step
    records = [r for f in flushes for r, _ in f]
    verdicts = [v for f in flushes for _, v in f]
    assert [r["loss"] for r in records] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert [r["grad_norm"] for r in records] == [0.5, 1.0, 1.5, 2.0, 2.5]
    assert [r["consumed_tokens"] for r in records] == [64, 128, 192, 256, 320]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert [v.skipped for v in verdicts] == [False, False, True, False, False]
    assert [v.streak for v in verdicts] == [0, 0, 1, 0, 0]
    assert math.isclose(records[0]["lr"], 1e-3) and math.isclose(records[4]["lr"], 5e-3)
    for flush in flushes:  # the interval's average time, the same for each of its steps
        assert len({r["step_time"] for r, _ in flush}) == 1 and flush[0][0]["step_time"] > 0
        assert math.isclose(flush[0][0]["mfu"], 10.0 * flush[0][0]["tokens_per_sec"] / 1e6)


def _per_step_vs_per_interval(run_dir: str) -> list[list[dict]]:
    from megatron.core import parallel_state

    from pretrain.config import compose
    from pretrain.train import build

    runs = []
    for interval in (1, 4):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        cfg = compose([*TINY, "parallel.zero_stage=1", "train.max_steps=6", "faults.nan_steps=[3]",
                       f"train.log_interval={interval}", f"run.dir={run_dir}/{interval}"], world_size=2)
        runs.append(build(cfg).run())
    return runs


def test_reading_every_step_or_every_fourth_gives_the_same_records(tmp_path) -> None:
    from helpers import run_distributed

    # Same processes, threads and batches: only when the host reads the device differs, so every
    # step's loss, norm, lr and skip count must be bit-identical (step 3 is poisoned and skipped).
    every, fourth = run_distributed(_per_step_vs_per_interval, 2, str(tmp_path))[0]
    keys = ("step", "loss", "grad_norm", "lr", "skipped_steps", "consumed_tokens")
    assert [[repr(r[k]) for k in keys] for r in every] == [[repr(r[k]) for k in keys] for r in fourth]  # nan == nan
    assert [r["step"] for r in fourth] == [1, 2, 3, 4, 5, 6] and [r["skipped_steps"] for r in fourth] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(fourth[2]["loss"]) and all(math.isfinite(r["grad_norm"]) for i, r in enumerate(fourth) if i != 2)
    # The log_interval=4 run read steps 2-4 in one flush (after step 1, the first): one shared step_time.
    assert len({r["step_time"] for r in fourth[1:4]}) == 1


class HostReadTrap:
    """A FaultHook (pretrain.faults) that records every read of a tensor's value by the host
    (aten._local_scalar_dense: .item(), bool(), float()) from the loss of step `arm` to the
    gradients of step `disarm`, steps between two metric reads, with the function that made it.

    On CPU, reads cost nothing, but each is a place where a GPU run would wait for its queue;
    tests/test_gpu.py checks the same steps under CUDA's sync debug mode where a GPU exists."""

    def __init__(self, arm: int, disarm: int) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        trap = self

        class Reads(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    trap.reads.append(trap.reader())
                return func(*args, **(kwargs or {}))

        self.arm, self.disarm, self.mode, self.reads = arm, disarm, Reads(), []

    @staticmethod
    def reader() -> str:
        """The innermost caller outside torch: `path:function`, e.g. `deepspeed/runtime/utils.py:has_overflow_serial`."""
        import traceback

        root = f"{Path(__file__).resolve().parents[1]}/"
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename and not frame.filename.endswith("test_step_metrics.py"):
                return f"{frame.filename.removeprefix(root).split('site-packages/')[-1]}:{frame.name}"
        return "?"

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == self.arm:
            self.mode.__enter__()
        return loss

    def gradients(self, step: int, model: torch.nn.Module) -> None:
        if step == self.disarm:
            self.mode.__exit__(None, None, None)

    def inside_step(self, step: int) -> None:
        pass


# Reads of tensors that live on the host by design (on a GPU run too): the stop flag, all-reduced
# over a CPU group (pretrain.train.StopSignal), and the loader's position ids, from which attention
# finds document boundaries (pretrain.model.attention).
HOST_TENSOR_READERS = {"pretrain/train.py:agreed", "pretrain/model/attention.py:_single_document"}
NO_READ_LAYOUTS = {"fp32 ZeRO-0": ["train.precision=fp32", "parallel.zero_stage=0"],
                   "bf16 ZeRO-0": ["train.precision=bf16", "parallel.zero_stage=0"],
                   "bf16 ZeRO-1, one rank": ["train.precision=bf16", "parallel.zero_stage=1"]}


def _host_reads(run_dir: str) -> dict[str, tuple[str, list[str]]]:
    from megatron.core import parallel_state

    from helpers import SyntheticBatches
    from pretrain.config import compose
    from pretrain.train import build

    out = {}
    for name, layout in NO_READ_LAYOUTS.items():
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        # log_interval 8 with 8 steps: the metrics are read after step 1 and step 8 only.
        cfg = compose([*TINY, *layout, "train.max_steps=8", "train.log_interval=8", "train.sample_tokens=0",
                       "checkpoint.save_final=false", f"run.dir={run_dir}/{len(out)}"], world_size=1)
        trap = HostReadTrap(arm=3, disarm=7)
        trainer = build(cfg, faults=trap, batches=SyntheticBatches(cfg.model.vocab_size, cfg.train.seq_len,
                                                                   cfg.train.micro_batch_size, [0], seed=0))
        records = trainer.run()
        assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
        out[name] = (type(trainer.engine.optimizer).__name__, trap.reads)
    return out


def test_steps_between_metric_reads_read_no_device_value(tmp_path) -> None:
    """Five steps (backward, guard, clipping, optimizer step, metrics, stop flag) read nothing back
    from the training tensors, in fp32 and in bf16. DeepSpeed's bf16 optimizers read each step (its
    ZeRO-0 wrapper: every parameter's overflow and the norm, ~150 reads for the 1b preset), which is
    why bf16 on one data-parallel rank runs under autocast in the plain engine (pretrain.precision)."""
    from helpers import run_distributed

    runs = run_distributed(_host_reads, 1, str(tmp_path))[0]
    for name, (optimizer, reads) in runs.items():
        device_reads = [r for r in reads if r not in HOST_TENSOR_READERS]
        assert not device_reads, f"{name}: the host read device values in {sorted(set(device_reads))}"
        assert optimizer == "AdamW", f"{name}: built {optimizer}, not the plain engine"
        assert reads, f"{name}: the trap saw no read at all (not even the stop flag's): it was not armed"
