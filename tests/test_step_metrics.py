"""Per-step metrics are kept on the device and read once per log interval, with the same values
a per-step read would give: the data-parallel mean loss of every step, in step order."""

from __future__ import annotations

import math

from helpers import run_distributed


def _metrics(losses_per_rank: list[list[float]]) -> list[list[dict]]:
    import torch
    import torch.distributed as dist

    from pretrain.step_metrics import StepMetrics

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    metrics = StepMetrics(torch.device("cpu"), None, dist.get_world_size(), tokens_per_step=64,
                          flops_per_token=10.0, peak_flops=1e6)
    flushes = []
    for i, loss in enumerate(losses_per_rank[rank]):
        metrics.step_started()
        metrics.add(i + 1, torch.tensor(loss), torch.tensor(0.5 * (i + 1)), lr=1e-3 * (i + 1),
                    consumed_tokens=64 * (i + 1))
        if (i + 1) % 3 == 0 or i + 1 == len(losses_per_rank[rank]):
            flushes.append(metrics.flush())
    flushes.append(metrics.flush())  # nothing pending: nothing written
    return flushes


def test_metrics_are_read_once_per_interval_with_every_steps_dp_mean() -> None:
    per_rank = [[4.0, 3.0, 2.5, 2.0, 1.5], [2.0, 1.0, 0.5, 1.0, 0.5]]
    rank0, rank1 = run_distributed(_metrics, 2, per_rank)
    assert [[r["step"] for r in f] for f in rank0] == [[1, 2, 3], [4, 5], []]  # one record per step
    records = [r for f in rank0 for r in f]
    assert [r["loss"] for r in records] == [3.0, 2.0, 1.5, 1.5, 1.0]  # the mean over both DP ranks
    assert [r["grad_norm"] for r in records] == [0.5, 1.0, 1.5, 2.0, 2.5]
    assert [r["consumed_tokens"] for r in records] == [64, 128, 192, 256, 320]
    assert math.isclose(records[0]["lr"], 1e-3)
    for flush in rank0[:2]:  # the interval's average time, the same for each of its steps
        assert len({r["step_time"] for r in flush}) == 1 and flush[0]["step_time"] > 0
        assert math.isclose(flush[0]["mfu"], 10.0 * flush[0]["tokens_per_sec"] / 1e6)
    assert [r["loss"] for f in rank1 for r in f] == [r["loss"] for r in records]  # every rank agrees
