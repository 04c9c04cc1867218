"""The DeepSpeed config generated from ours: fp32 gradient reduction under bf16, ZeRO buckets and
overlap from config; and the device rule for tensor-parallel gathers."""

from __future__ import annotations

import pytest

from helpers import TINY, run_distributed


def _ds(overrides: list[str], precision: str) -> dict:
    from pretrain.config import compose
    from pretrain.parallel.engine import deepspeed_config

    return deepspeed_config(compose([*TINY, *overrides]), 1, precision)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_and_reduces_gradients_in_fp32_by_default(stage: int) -> None:
    ds = _ds([f"parallel.zero_stage={stage}"], "bf16")
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["communication_data_type"] == "fp32"  # DeepSpeed's default would be bf16


def test_bf16_without_zero_keeps_fp32_weights_and_reduces_in_fp32_and_bf16_can_be_chosen() -> None:
    ds = _ds(["parallel.zero_stage=0"], "bf16")
    assert ds["communication_data_type"] == "fp32"
    # fp32 weights and gradients under autocast (pretrain.precision): DeepSpeed's bf16 mode stays off
    assert ds["bf16"]["enabled"] is False and "data_types" not in ds
    assert ds["gradient_clipping"] == 0.0  # the plain engine clips in pretrain.train, with the norm it computed
    assert all(_ds([f"parallel.zero_stage={z}"], "bf16")["bf16"]["enabled"] for z in (1, 2, 3))
    ds = _ds(["parallel.zero_stage=2", "train.grad_reduce_dtype=bf16"], "bf16")
    assert ds["data_types"]["grad_accum_dtype"] == "bf16" and ds["communication_data_type"] == "bf16"
    assert "communication_data_type" not in _ds(["parallel.zero_stage=2"], "fp32")


def test_zero_buckets_and_overlap_come_from_config() -> None:
    zero = _ds(["parallel.zero_stage=2", "parallel.overlap_comm=true", "parallel.reduce_bucket_size=1000",
                "parallel.allgather_bucket_size=2000", "parallel.contiguous_gradients=false"], "fp32")
    zero = zero["zero_optimization"]
    assert (zero["overlap_comm"], zero["reduce_bucket_size"], zero["allgather_bucket_size"],
            zero["contiguous_gradients"]) == (True, 1000, 2000, False)
    assert _ds(["parallel.zero_stage=3"], "fp32")["zero_optimization"]["overlap_comm"] is False  # CPU default


def test_bad_bucket_size_is_one_clear_line() -> None:
    from pretrain.config import ConfigError, compose

    with pytest.raises(ConfigError, match="parallel.reduce_bucket_size"):
        compose([*TINY, "parallel.reduce_bucket_size=0"])


def _gather_device() -> tuple[str, list[float]]:
    import torch
    import torch.distributed as dist

    from pretrain.parallel.groups import init_distributed
    from pretrain.parallel.sharding import gather, group_device

    init_distributed(2, "cpu")
    from megatron.core import parallel_state

    param = torch.nn.Parameter(torch.zeros(2, 3))
    param.tensor_model_parallel, param.partition_dim = True, 0
    local = torch.full((2, 3), float(dist.get_rank()))
    full = gather(local, param)
    return str(group_device(parallel_state.get_tensor_model_parallel_group())), full[:, 0].tolist()


def test_tp_gather_runs_on_the_groups_device() -> None:
    # gloo gathers CPU tensors; under NCCL group_device is the rank's GPU (tests/test_gpu.py).
    rank0, rank1 = run_distributed(_gather_device, 2)
    assert rank0 == rank1 == ("cpu", [0.0, 0.0, 1.0, 1.0])


def _bucket_runs(run_dir: str) -> dict[str, list[float]]:
    from megatron.core import parallel_state

    from helpers import losses, train

    tuned = ["parallel.overlap_comm=true", "parallel.reduce_bucket_size=3000", "parallel.allgather_bucket_size=5000",
             "parallel.contiguous_gradients=false"]
    out = {}
    for stage in (1, 2):
        for name, extra in (("default", []), ("tuned", tuned)):
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            records, trainer = train([*TINY, f"parallel.zero_stage={stage}", "train.max_steps=5", *extra],
                                     f"{run_dir}/{stage}-{name}", synthetic=True)
            zero = trainer.engine.optimizer  # DeepSpeed's ZeRO optimizer took the settings
            out[f"{stage}-{name}"] = losses(records) + [r["grad_norm"] for r in records]
            out[f"{stage}-{name}-engine"] = [zero.overlap_comm, zero.reduce_bucket_size, zero.contiguous_gradients]
            out["parameters"] = sum(p.numel() for p in trainer.engine.module.parameters())
    return out


def test_small_buckets_and_overlap_train_to_the_same_losses() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        runs = run_distributed(_bucket_runs, 2, run_dir)[0]
    # ~70 buckets of 3000 elements instead of one, reduced on DeepSpeed's side stream: each gradient
    # element is still the sum of the same two ranks' values (exact at DP=2, and here equal bit for
    # bit), but bucketing may change the order in which partial norms and, with more ranks, ring
    # reductions add up, which moves the last bits of fp32. Hence a tolerance, not equality.
    for stage in (1, 2):
        default, tuned = runs[f"{stage}-default"], runs[f"{stage}-tuned"]
        # the default bucket (500M elements) is capped at the model's size: one bucket, no 2 GB buffer
        assert runs[f"{stage}-default-engine"] == [False, runs["parameters"], True]
        assert runs[f"{stage}-tuned-engine"] == [True, 3000, False]
        assert len(default) == len(tuned) == 10
        print(f"ZeRO-{stage}: max relative difference {max(abs(a - b) / abs(a) for a, b in zip(default, tuned)):.2e}")
        assert max(abs(a - b) / abs(a) for a, b in zip(default, tuned)) < 1e-5, (stage, default, tuned)
