"""`python -m launch [--dry-run] [--cfg] [hydra overrides...]`: compose, validate, plan, start workers.

Configuration errors are reported in one line before any worker starts. Workers receive the same
overrides and compose the same configuration.
"""

from __future__ import annotations

import os
import shlex
import sys

import pretrain.parallel  # noqa: F401
from launch.plan import make_plan
from pretrain.config import ConfigError, compose, to_yaml

USAGE = """usage: python -m launch [--dry-run] [--cfg] [key=value ...]

Trains a GPT with the configuration composed from conf/ and the Hydra overrides given, e.g.
  python -m launch model=125m parallel.zero_stage=3 train.max_steps=1000 run.dir=runs/r1
  python -m launch launcher=slurm launcher.nnodes=2 model=1b parallel.tp=2
--dry-run  print the plan and the exact commands, start nothing (same as launcher.dry_run=true)
--cfg      print the composed configuration (every key, with its value) and exit
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(USAGE)
        return 0
    dry_run = "--dry-run" in args
    show_cfg = "--cfg" in args or "--cfg=job" in args
    overrides = [a for a in args if a not in ("--dry-run", "--cfg", "--cfg=job", "job")]
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        print(f"launch: unknown option {unknown[0]}; options are --dry-run, --cfg, --help", file=sys.stderr)
        return 2
    try:
        cfg = compose(overrides)
        if show_cfg:
            print(to_yaml(cfg))
            return 0
        nnodes = None
        if cfg.launcher.kind == "slurm":
            from launch import slurm

            if slurm.in_allocation():  # the allocation decides the nodes; the job name the run
                overrides = slurm.job_overrides(overrides)
                cfg = compose(overrides)
                nnodes = slurm.allocation_nodes()
        plan = make_plan(cfg, nnodes)
        compose(overrides, world_size=plan.world_size)  # layout checks that need the world size
        print(plan.describe(), flush=True)
        if cfg.launcher.kind == "slurm":
            command, env = slurm.slurm_command(cfg, plan, overrides), {}
        else:
            from launch.local import torchrun_command, worker_env

            command, env = torchrun_command(cfg, plan, overrides), worker_env(cfg, dict(os.environ))
        if cfg.launcher.threads_per_process:  # launch/agent.py keeps an OMP_NUM_THREADS it is given
            env["OMP_NUM_THREADS"] = str(cfg.launcher.threads_per_process)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print("command: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + (" " if env else "")
          + shlex.join(command), flush=True)
    if dry_run or cfg.launcher.dry_run:
        return 0
    if not command[0].endswith("sbatch"):  # a submitted job creates its run.dir itself
        os.makedirs(cfg.run.dir, exist_ok=True)
    os.environ.update(env)
    # Replace this process, so signals from SLURM or the user reach the agent (or srun) directly.
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
