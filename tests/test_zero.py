"""ZeRO stages 0-3 on two data-parallel ranks follow the single-process loss curve."""

from __future__ import annotations

import pytest

from helpers import TINY, losses, run_distributed, train

STEPS = 6


def _train_dp(stage: int, run_dir: str, extra: tuple[str, ...] = ()) -> list[float]:
    records, _ = train(TINY + [f"train.max_steps={STEPS}", f"parallel.zero_stage={stage}", *extra], run_dir,
                       synthetic=True)
    return losses(records)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    # One process seeing both DP ranks' micro-batches: the same global batch as the DP=2 runs.
    return run_distributed(_reference, 1, str(tmp_path_factory.mktemp("reference")))[0]


def _reference(run_dir: str) -> list[float]:
    records, _ = train(TINY + [f"train.max_steps={STEPS}", "parallel.zero_stage=0",
                               "train.micro_batch_size=4"], run_dir, synthetic=[0, 1])
    return losses(records)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process(stage: int, reference: list[float], tmp_path) -> None:
    rank0, rank1 = run_distributed(_train_dp, 2, stage, str(tmp_path))
    assert rank0 == rank1  # the logged loss is the DP mean, identical on every rank
    assert len(rank0) == STEPS
    assert reference[-1] < reference[0]  # it trains
    for step, (got, want) in enumerate(zip(rank0, reference)):
        assert abs(got - want) < 1e-4, f"step {step + 1}: ZeRO-{stage} loss {got} vs reference {want}"


def test_gradient_accumulation_matches_the_larger_batch(reference: list[float], tmp_path) -> None:
    # Two micro-batches of one sequence per rank and step: the same global batch as the reference.
    rank0, _ = run_distributed(_train_dp, 2, 2, str(tmp_path),
                               ("train.micro_batch_size=1", "train.grad_accum_steps=2"))
    assert max(abs(a - b) for a, b in zip(rank0, reference)) < 1e-4


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_on_cpu_follows_the_fp32_curve(stage: int, reference: list[float], tmp_path) -> None:
    """ZeRO-0: autocast over fp32 weights, gradients all-reduced by the plain engine; ZeRO-1:
    DeepSpeed's bf16 weights with fp32 master partitions (pretrain.precision)."""
    rank0, _ = run_distributed(_train_dp, 2, stage, str(tmp_path), ("train.precision=bf16",))
    assert len(rank0) == STEPS
    # bf16 rounds activations and weights (8-bit mantissa): close to fp32, not equal.
    assert max(abs(a - b) for a, b in zip(rank0, reference)) < 0.05
    assert rank0 != reference


def _one_rank(stage: int, precision: str, run_dir: str) -> tuple[int, str, list[float]]:
    from pretrain.parallel.engine import base_optimizer

    records, trainer = train(TINY + [f"train.max_steps={STEPS}", f"parallel.zero_stage={stage}",
                                     f"train.precision={precision}"], run_dir, synthetic=True)
    return (trainer.engine.zero_optimization_stage(), type(base_optimizer(trainer.engine)).__name__, losses(records))


def _one_rank_stages(run_dir: str) -> dict[str, tuple[int, str, list[float]]]:
    from megatron.core import parallel_state

    out = {}
    for stage, precision in [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (1, "bf16"), (2, "bf16")]:
        if parallel_state.model_parallel_is_initialized():  # the previous run's grid
            parallel_state.destroy_model_parallel()
        out[f"{stage}-{precision}"] = _one_rank(stage, precision, f"{run_dir}/{stage}-{precision}")
    return out


def test_zero1_and_zero2_on_one_rank_run_as_zero0(tmp_path) -> None:
    """One data-parallel rank has nothing to partition: ZeRO-1/2 build the plain engine (no flat
    fp32 copies of gradients and weights) and train exactly as ZeRO-0, in fp32 and in bf16 (which
    there runs under autocast over fp32 weights, so its gradients are fp32 too)."""
    from launch.plan import make_plan
    from pretrain.config import compose

    runs = run_distributed(_one_rank_stages, 1, str(tmp_path))[0]
    plain = runs["0-fp32"]
    assert plain[0] == 0 and plain[1] == "AdamW"
    for name in ("1-fp32", "2-fp32"):
        assert runs[name] == plain, name  # same engine, same reduction order: bit-exact
    autocast = runs["0-bf16"]
    assert autocast[0] == 0 and autocast[1] == "AdamW"
    for name in ("1-bf16", "2-bf16"):
        assert runs[name] == autocast, name
    # bf16 matmuls: near the fp32 losses, not equal to them
    assert autocast[2] != plain[2] and max(abs(a - b) for a, b in zip(autocast[2], plain[2])) < 0.05
    for precision in ("fp32", "bf16"):
        plans = {stage: make_plan(compose([*TINY, f"parallel.zero_stage={stage}", "launcher.nproc_per_node=1",
                                           f"train.precision={precision}"])) for stage in (0, 1)}
        assert plans[1].zero_stage == 0 and plans[1].memory_gib == plans[0].memory_gib
