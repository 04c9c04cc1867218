"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay (WSD).

The rate is a pure function of the optimizer step, so a resumed or annealing run needs no
scheduler state: whatever step it starts at, it gets the rate the schedule has there.

WSD holds the peak rate after warmup and decays only at the end, over `decay_fraction` of the
steps, or from `decay_start_step` on. A stable run can therefore be forked at any checkpoint into
an annealing run (same schedule, decay_start_step = the checkpoint's step) without having fixed
its length in advance.
"""

from __future__ import annotations

import math

from pretrain.config import OptimConfig


def decay_factor(progress: float, shape: str) -> float:
    """Fraction of (peak - min) still left at `progress` in [0, 1] through the decay."""
    progress = min(1.0, max(0.0, progress))
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":  # fast early drop, long tail (Hägele et al. 2024)
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"unknown decay shape {shape!r}")


def wsd_decay_start(cfg: OptimConfig, max_steps: int) -> int:
    """First step of the WSD decay: decay_start_step, else the last decay_fraction of the run."""
    if cfg.decay_start_step is not None:
        return cfg.decay_start_step
    return max_steps - round(cfg.decay_fraction * max_steps)


def learning_rate(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for the optimizer step numbered `step` (0-based); a pure function so resume needs no state."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        start = wsd_decay_start(cfg, max_steps)
        if step < start:
            return cfg.lr
        # Counted so that the first decay step is already below the peak and the last step
        # (max_steps - 1) trains at exactly min_lr.
        progress = (step - start + 1) / max(1, max_steps - start)
        return min_lr + (cfg.lr - min_lr) * decay_factor(progress, cfg.decay_shape)
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return min_lr + (cfg.lr - min_lr) * decay_factor(progress, cfg.schedule)
