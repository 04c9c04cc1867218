"""Learning-rate schedule: linear warmup, then cosine or linear decay to lr * min_lr_ratio."""

from __future__ import annotations

import math

from pretrain.config import OptimConfig


def learning_rate(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for the optimizer step numbered `step` (0-based); a pure function so resume needs no state."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))
