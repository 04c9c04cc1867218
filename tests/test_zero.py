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


def test_bf16_on_cpu_follows_the_fp32_curve(reference: list[float], tmp_path) -> None:
    rank0, _ = run_distributed(_train_dp, 2, 1, str(tmp_path), ("train.precision=bf16",))
    assert len(rank0) == STEPS
    # bf16 rounds activations and weights (8-bit mantissa): close to fp32, not equal.
    assert max(abs(a - b) for a, b in zip(rank0, reference)) < 0.05
    assert rank0 != reference
