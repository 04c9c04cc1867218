"""Start the workers on this node with torch's elastic launcher (torchrun)."""

from __future__ import annotations

import sys

from launch.plan import Plan
from pretrain.config import Config


def torchrun_command(cfg: Config, plan: Plan, overrides: list[str]) -> list[str]:
    """The worker command as an argument list (user strings are never pasted into a shell)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={plan.nproc_per_node}", f"--max_restarts={cfg.launcher.max_restarts}",
            "-m", "pretrain.train", *overrides]
