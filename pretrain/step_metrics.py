"""Per-step training metrics that cost the device nothing until they are logged.

Reading a loss with `.item()` or all-reducing it every step makes the host wait for the GPU each
step, so the next step's kernels cannot be queued behind the current ones. Instead each step's
loss and gradient norm stay on the device; at a log boundary (every `train.log_interval` steps and
before an eval, a checkpoint or a stop) one all-reduce averages all of them over the data-parallel
ranks and one host read fetches them. metrics.jsonl still gets one record per step with that
step's loss and gradient norm, written at the boundary; step_time, tokens_per_sec and mfu are the
interval's average (individual steps are not timed, which would need a device sync per step).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist


class StepMetrics:
    def __init__(self, device: torch.device, dp_group: Any, dp_size: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops: float) -> None:
        self.device, self.dp_group, self.dp_size = device, dp_group, dp_size
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self._pending: list[tuple[int, torch.Tensor, Any, float, int]] = []  # step, loss, norm, lr, tokens
        self._since = time.perf_counter()

    def step_started(self) -> None:
        """Start the interval's clock at its first step (so evals and saves between intervals
        do not count as training time)."""
        if not self._pending:
            self._since = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float, lr: float,
            consumed_tokens: int) -> None:
        """Keep this rank's mean loss of `step` (a device tensor) and the global gradient norm."""
        if torch.is_tensor(grad_norm):  # a copy: the engine may reuse its tensor next step
            grad_norm = grad_norm.detach().clone()
        self._pending.append((step, loss.detach().float().reshape(()), grad_norm, lr, consumed_tokens))

    def flush(self) -> list[dict[str, Any]]:
        """One record per step since the last flush; collective over the data-parallel group."""
        if not self._pending:
            return []
        losses = torch.stack([loss for _, loss, _, _, _ in self._pending])
        dist.all_reduce(losses, group=self.dp_group)
        norms = torch.stack([torch.as_tensor(norm, dtype=torch.float32).to(self.device).reshape(())
                             for _, _, norm, _, _ in self._pending])
        values = torch.stack([losses / self.dp_size, norms]).tolist()  # the interval's one host read
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # so the interval's time covers all of its queued work
        step_time = (time.perf_counter() - self._since) / len(self._pending)
        tokens_per_sec = self.tokens_per_step / step_time
        records = [{"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_sec": tokens_per_sec,
                    "mfu": self.flops_per_token * tokens_per_sec / self.peak_flops, "consumed_tokens": tokens,
                    "step_time": step_time}
                   for (step, _, _, lr, tokens), loss, norm in zip(self._pending, *values)]
        self._pending.clear()
        return records
