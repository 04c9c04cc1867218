"""Fault injection for tests: the seam through which a test damages chosen steps on purpose.

The trainer calls a `FaultHook` at three points of every step. `NoFaults` does nothing;
`ConfiguredFaults` does what the `faults.*` keys say (for tests and drills only, never for training:
it is how the tests poison a loss with NaN, make it spike, poison gradients, hang a rank inside a
step, or kill one with SIGKILL). Steps are numbered as in metrics.jsonl (the first step is 1).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Protocol

import torch

from pretrain.config import FaultConfig


class FaultHook(Protocol):
    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss that is back-propagated and reported."""

    def gradients(self, step: int, model: torch.nn.Module) -> None:
        """Called after the last backward of a step, before the optimizer step."""

    def inside_step(self, step: int) -> None:
        """Called in the middle of a step (after the first forward)."""


class NoFaults:
    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def gradients(self, step: int, model: torch.nn.Module) -> None:
        pass

    def inside_step(self, step: int) -> None:
        pass


class ConfiguredFaults:
    """The faults the `faults.*` config keys ask for, on this rank.

    Each listed step is damaged once per process: after a rollback the run passes the same step
    numbers again with other batches, as it would after a real bad batch.
    """

    def __init__(self, cfg: FaultConfig, rank: int) -> None:
        self.cfg, self.rank = cfg, rank
        self._done: set[tuple[str, int]] = set()

    def _once(self, kind: str, step: int, steps: list[int]) -> bool:
        if step not in steps or (kind, step) in self._done:
            return False
        self._done.add((kind, step))
        return True

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self._once("nan", step, self.cfg.nan_steps):
            return loss * float("nan")
        if self._once("spike", step, self.cfg.spike_steps):
            return loss * 1000.0
        return loss

    def gradients(self, step: int, model: torch.nn.Module) -> None:
        if self._once("nan_grad", step, self.cfg.nan_grad_steps):
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.fill_(float("nan"))

    def inside_step(self, step: int) -> None:
        if self.rank != self.cfg.rank:
            return
        if step == self.cfg.hang_step:
            sleep_inside_step(self.cfg.hang_seconds)
        # Only on the first attempt: the restarted group passes this step again and must live.
        if step == self.cfg.kill_step and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


def sleep_inside_step(seconds: float) -> None:
    """A rank that stops making progress mid-step (the frame the hang watchdog must name)."""
    time.sleep(seconds)


def from_config(cfg: FaultConfig, rank: int) -> FaultHook:
    quiet = not (cfg.nan_steps or cfg.spike_steps or cfg.nan_grad_steps or cfg.hang_step or cfg.kill_step)
    return NoFaults() if quiet else ConfiguredFaults(cfg, rank)
