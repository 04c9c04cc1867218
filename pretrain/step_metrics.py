"""Per-step training metrics that cost the device nothing until they are logged.

Reading a loss with `.item()` every step makes the host wait for the GPU each step, so the next
step's kernels cannot be queued behind the current ones. Instead each step's verdict (the guard's
DP-mean loss, gradient norm, bad/spike flags, streak and skip count: pretrain/guard.py) stays on the
device; at a flush (every `train.log_interval` steps, and before anything that must know the state
of the run: an eval, a checkpoint, a stop, the last step) one host read fetches all of them.

metrics.jsonl still gets one record per step with that step's own loss, gradient norm and learning
rate, written at the flush. step_time, tokens_per_sec and mfu are the average of the interval the
flush closes (timing a single step would need a device sync per step).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pretrain.guard import Verdict


class StepMetrics:
    """The steps since the last flush, on the device; read all at once by `flush()`."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float) -> None:
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self._pending: list[tuple[int, torch.Tensor, float, int]] = []  # step, verdict row, lr, consumed tokens
        self._since = time.perf_counter()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def step_started(self) -> None:
        """Start the interval's clock at its first step (so evals and saves between intervals
        do not count as training time)."""
        if not self._pending:
            self._since = time.perf_counter()

    def add(self, step: int, verdict: torch.Tensor, grad_norm: torch.Tensor | float | None, lr: float,
            consumed_tokens: int) -> None:
        """Keep `step`'s verdict row (StepGuard.judge); grad_norm, where the engine reports it after
        its own step (a device tensor or a float), replaces the row's norm. No host read."""
        row = verdict.detach().float().clone()  # a copy: the engine may reuse its norm tensor next step
        if torch.is_tensor(grad_norm):
            row[1] = grad_norm.detach().to(row.device, row.dtype).reshape(())
        elif grad_norm is not None:
            row[1].fill_(float(grad_norm))  # a kernel argument: copying a Python number to the device would sync
        self._pending.append((step, row, lr, consumed_tokens))

    def flush(self) -> list[tuple[dict[str, Any], Verdict]]:
        """One (record, verdict) per step since the last flush, in step order: one device-to-host read."""
        if not self._pending:
            return []
        stacked = torch.stack([row for _, row, _, _ in self._pending])
        rows = stacked.tolist()  # the interval's one host read
        if stacked.device.type == "cuda":
            torch.cuda.synchronize()  # so the interval's time covers all of its queued work (optimizer steps)
        step_time = (time.perf_counter() - self._since) / len(self._pending)
        tokens_per_sec = self.tokens_per_step / step_time
        out = []
        for (step, _, lr, tokens), values in zip(self._pending, rows):
            verdict = Verdict.from_values(values)
            out.append(({"step": step, "loss": verdict.loss, "lr": lr, "grad_norm": verdict.grad_norm,
                         "tokens_per_sec": tokens_per_sec, "mfu": self.flops_per_token * tokens_per_sec / self.peak_flops,
                         "consumed_tokens": tokens, "step_time": step_time, "skipped_steps": verdict.skipped_steps},
                        verdict))
        self._pending.clear()
        return out
