"""The CUDA path: bf16 training, NCCL checkpoints in every ZeRO stage, resume in another layout,
init_from, RNG of the GPU, the TP gather's device and the memory planner. Marked `gpu`: collected
everywhere, skipped without CUDA (tests/conftest.py). `python tools/gpu_check.py` runs them.

One GPU per rank (NCCL cannot put two ranks on one GPU): tests that need two are skipped on one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY, losses, run_distributed, train

pytestmark = pytest.mark.gpu

# TINY on the GPU in bf16 (TINY itself pins the CPU and fp32).
GPU = [o for o in TINY if not o.startswith(("train.device=", "train.precision="))] + [
    "train.device=cuda", "train.precision=bf16"]
STEPS = 8


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _curve(overrides: list[str], run_dir: str) -> list[float]:
    records, trainer = train([*GPU, f"train.max_steps={STEPS}", *overrides], run_dir, synthetic=[0, 1])
    assert trainer.dims.device.type == "cuda"
    assert trainer.precision == ("fp32" if "train.precision=fp32" in overrides else "bf16")
    return losses(records)


def test_bf16_training_tp1_follows_the_fp32_curve(tmp_path: Path) -> None:
    bf16 = run_distributed(_curve, 1, ["train.micro_batch_size=4"], str(tmp_path / "bf16"))[0]
    fp32 = run_distributed(_curve, 1, ["train.micro_batch_size=4", "train.precision=fp32"], str(tmp_path / "fp32"))[0]
    assert len(bf16) == STEPS and all(map(torch.isfinite, torch.tensor(bf16)))
    assert bf16[-1] < bf16[0]  # it trains
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.05  # bf16 rounding, not a different model


@pytest.mark.skipif(_gpus() < 2, reason="needs two GPUs")
def test_bf16_training_tp2_matches_tp1(tmp_path: Path) -> None:
    tp1 = run_distributed(_curve, 1, ["train.micro_batch_size=4"], str(tmp_path / "tp1"))[0]
    tp2 = run_distributed(_curve, 2, ["train.micro_batch_size=4", "parallel.tp=2",
                                      "parallel.sequence_parallel=true"], str(tmp_path / "tp2"))
    assert tp2[0] == tp2[1]
    assert max(abs(a - b) for a, b in zip(tp1, tp2[0])) < 0.05


def _save_then_resume(run_dir: str, save_overrides: list[str], resume_overrides: list[str]) -> tuple[list, list]:
    base = [*GPU, "train.micro_batch_size=4", "checkpoint.keep_last=0"]
    full, _ = train([*base, "train.max_steps=6", "checkpoint.interval=3", *save_overrides], run_dir)
    # The same run directory in another layout, resuming from the step-3 checkpoint.
    ckpts = Path(run_dir) / "checkpoints"
    (ckpts / "latest").write_text("step_00000003\n")
    resumed, _ = train([*base, "train.max_steps=6", "checkpoint.interval=0", *resume_overrides], run_dir)
    return losses(full), losses(resumed)


def test_save_then_resume_in_another_zero_stage(tmp_path: Path) -> None:
    full, resumed = run_distributed(_save_then_resume, 1, str(tmp_path), ["parallel.zero_stage=1"],
                                    ["parallel.zero_stage=3"])[0]
    assert len(resumed) == 3
    # One rank: ZeRO-1 runs as ZeRO-0, autocast over fp32 weights; ZeRO-3 keeps bf16 weights
    # (pretrain.precision). Another precision mode rounds differently: close, not equal.
    assert max(abs(a - b) for a, b in zip(resumed, full[3:])) < 0.05


def _resume_only(run_dir: str, overrides: list[str]) -> list[float]:
    (Path(run_dir) / "checkpoints" / "latest").write_text("step_00000003\n")
    records, trainer = train([*GPU, "train.micro_batch_size=4", "train.max_steps=6", "checkpoint.interval=0",
                              *overrides], run_dir)
    assert trainer.dims.world_size == 1
    return losses(records)


@pytest.mark.skipif(_gpus() < 2, reason="needs two GPUs")
def test_tp2_checkpoint_saves_over_nccl_and_resumes_in_tp1(tmp_path: Path) -> None:
    # The save all-gathers TP shards over NCCL: the tensors must be on the GPU (sharding.group_device).
    full, _ = run_distributed(_save_then_resume, 2, str(tmp_path), ["parallel.tp=2", "parallel.sequence_parallel=true"],
                              ["parallel.tp=2", "parallel.sequence_parallel=true"])[0]
    resumed = run_distributed(_resume_only, 1, str(tmp_path), ["parallel.tp=1"])[0]
    assert len(resumed) == 3
    assert max(abs(a - b) for a, b in zip(resumed, full[3:])) < 0.02


def test_bf16_checkpoints_round_trip_in_every_zero_stage(tmp_path: Path) -> None:
    from test_bf16_checkpoint import SAVE_AT, STEPS as CKPT_STEPS, _all_stages, _tensors

    base = [*GPU, "checkpoint.keep_last=0", "optim.lr=1e-2", "model.compile=false"]  # 16 builds: no compiling
    runs = run_distributed(_all_stages, 1, str(tmp_path), base)[0]
    for stage, out in runs.items():
        root = tmp_path / f"zero{stage}"
        saved = _tensors(root / "full" / "checkpoints" / f"step_{SAVE_AT:08d}")
        regathered = _tensors(Path(out["resumed_regathered"]))
        for name, value in saved.items():
            assert torch.equal(value, regathered[name]), f"ZeRO-{stage}: {name} changed on load"
        assert out["resumed"] == out["full"][SAVE_AT:], f"ZeRO-{stage}: resume is not bit-exact on the GPU"
        source = _tensors(root / "full" / "checkpoints" / f"step_{CKPT_STEPS:08d}")
        loaded = _tensors(Path(out["init_regathered"]))
        for name, value in source.items():
            if not name.endswith(("exp_avg", "exp_avg_sq")):
                assert torch.equal(loaded[name], value), f"ZeRO-{stage}: init_from lost {name}'s fp32 master"


def _rng_and_device(run_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors import safe_open

    from pretrain.parallel.sharding import group_device

    records, trainer = train([*GPU, "train.max_steps=2", "parallel.zero_stage=1"], run_dir)
    ckpt = Path(run_dir) / "checkpoints" / "step_00000002"
    with safe_open(str(ckpt / "rng-00000.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
        saved_cuda = f.get_tensor("torch_cuda")
    return {"keys": keys, "cuda_state_matches": torch.equal(saved_cuda, torch.cuda.get_rng_state()),
            "tp_device": str(group_device(parallel_state.get_tensor_model_parallel_group())),
            "backend": dist.get_backend()}


def test_checkpoint_carries_the_gpu_rng_and_gathers_on_the_gpu(tmp_path: Path) -> None:
    out = run_distributed(_rng_and_device, 1, str(tmp_path))[0]
    assert out["backend"] == "nccl" and out["tp_device"] == "cuda:0"
    assert {"torch_cpu", "torch_cuda", "python", "numpy_keys"} <= set(out["keys"])
    assert out["cuda_state_matches"]  # nothing drew from the GPU generator after the final save


def _peak_vs_plan(overrides: list[str], run_dir: str) -> tuple[float, dict]:
    from launch.plan import make_plan
    from pretrain.config import compose
    from pretrain.train import build

    cfg = compose([*GPU, *overrides, "train.max_steps=2", f"run.dir={run_dir}"], world_size=1)
    torch.cuda.reset_peak_memory_stats()
    trainer = build(cfg)
    trainer.run()
    measured = torch.cuda.max_memory_allocated() / 1024**3
    cfg.launcher.nproc_per_node = 1
    return measured, make_plan(cfg).memory_gib


# bf16 ZeRO-0 (autocast over fp32 weights), fp32 ZeRO-0 (ZeRO-1 on one rank is ZeRO-0) and bf16 ZeRO-3.
@pytest.mark.parametrize("layout", [["parallel.zero_stage=0"], ["parallel.zero_stage=0", "train.precision=fp32"],
                                    ["parallel.zero_stage=3"]])
def test_memory_plan_matches_the_measured_peak(tmp_path: Path, layout: list[str]) -> None:
    # A model big enough that weights, optimizer state and activations dominate CUDA's own buffers.
    shape = ["model.hidden_size=1024", "model.num_layers=8", "model.num_heads=16", "model.num_kv_heads=16",
             "model.vocab_size=32768", "data.embedded_vocab_size=1024", "train.seq_len=1024",
             "train.micro_batch_size=4"]
    measured, plan = run_distributed(_peak_vs_plan, 1, [*shape, *layout], str(tmp_path))[0]
    print(json.dumps({"layout": layout, "measured_gib": measured, "plan_gib": plan}))
    planned = plan["total"]
    assert abs(planned - measured) <= 0.15 * measured, f"{layout}: plan {planned:.2f} GiB vs peak {measured:.2f} GiB"


class SyncTrap:
    """A FaultHook (pretrain.faults) under which any host-device synchronisation raises: from the
    loss of step `arm` to the gradients of step `disarm`, steps between two metric reads. Everything
    the loop does in between (backward, guard, optimizer step, metrics, stop flag) runs inside it."""

    def __init__(self, arm: int, disarm: int) -> None:
        self.arm, self.disarm = arm, disarm
        self.trapped: list[int] = []

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step == self.arm:
            torch.cuda.set_sync_debug_mode("error")
        if self.arm <= step <= self.disarm:
            self.trapped.append(step)
        return loss

    def gradients(self, step: int, model: torch.nn.Module) -> None:
        if step == self.disarm:
            torch.cuda.set_sync_debug_mode(0)

    def inside_step(self, step: int) -> None:
        pass


def _steps_without_sync(run_dir: str, precision: str) -> tuple[list[dict], list[int]]:
    from helpers import SyntheticBatches

    from pretrain.config import compose
    from pretrain.train import build

    # log_interval 8 with 8 steps: the metrics are read after step 1 (the first) and step 8 only.
    # Steps 1-2 compile the blocks; the trap covers steps 3-7.
    overrides = [o for o in GPU if not o.startswith("train.precision=")]
    cfg = compose([*overrides, f"train.precision={precision}", "parallel.zero_stage=0", "train.max_steps=8",
                   "train.log_interval=8", "train.sample_tokens=0", f"run.dir={run_dir}"], world_size=1)
    trap = SyncTrap(arm=3, disarm=7)
    # Whole-document rows: the document-boundary path of attention is not what this test is about.
    batches = SyntheticBatches(cfg.model.vocab_size, cfg.train.seq_len, cfg.train.micro_batch_size, [0],
                               seed=cfg.train.seed)
    records = build(cfg, faults=trap, batches=batches).run()
    return records, trap.trapped


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_steps_between_metric_reads_never_synchronise_with_the_gpu(tmp_path: Path, precision: str) -> None:
    records, trapped = run_distributed(_steps_without_sync, 1, str(tmp_path), precision)[0]
    assert trapped == [3, 4, 5, 6, 7]  # the trap was armed for these steps, and nothing raised in them
    assert [r["step"] for r in records] == list(range(1, 9))  # still one record per step
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in records)
