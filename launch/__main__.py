"""`python -m launch [--dry-run] [--cfg] [hydra overrides...]`: compose, validate, plan, start workers.

Configuration errors, and a local dataset that does not fit the run, are reported in one line
before any worker starts. Workers receive the same overrides and compose the same configuration.
"""

from __future__ import annotations

import os
import shlex
import sys

import pretrain.parallel  # noqa: F401
from launch.plan import make_plan
from pretrain.config import Config, ConfigError, compose, to_yaml
from pretrain.data.checks import check_run_data
from pretrain.data.manifest import DatasetError, is_url

USAGE = """usage: python -m launch [--dry-run] [--cfg] [key=value ...]

Trains a GPT with the configuration composed from conf/ and the Hydra overrides given, e.g.
  python -m launch model=125m parallel.zero_stage=3 train.max_steps=1000 run.dir=runs/r1
  python -m launch launcher=slurm launcher.nnodes=2 model=1b parallel.tp=2
--dry-run  print the plan and the exact commands, start nothing (same as launcher.dry_run=true)
--cfg      print the composed configuration (every key, with its value) and exit
"""


def check_local_data(cfg: Config, dp: int) -> None:
    """The workers' dataset checks (pretrain.data.checks.check_run_data), here, where a wrong
    data.path or model.vocab_size costs no worker start-up. Only for datasets on this machine's
    disks: the embedded corpus is built by the workers, URLs and shard patterns are read by them."""
    if cfg.data.name == "embedded" or cfg.data.train_shards:
        return
    paths = [cfg.data.path or cfg.data.sources[0].path, *(s.path for s in cfg.data.sources)]
    if any(is_url(p) for p in paths):
        return
    check_run_data(paths[0], paths[1:], bool(cfg.train.eval_interval), dp, cfg.model.vocab_size)


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
        if cfg.launcher.kind == "local" or nnodes is not None:  # sbatch's host may not see the job's data
            check_local_data(cfg, plan.dp)
        print(plan.describe(), flush=True)
        if cfg.launcher.kind == "slurm":
            command, env = slurm.slurm_command(cfg, plan, overrides), {}
        else:
            from launch.local import torchrun_command, worker_env

            command, env = torchrun_command(cfg, plan, overrides), worker_env(cfg, dict(os.environ))
        if cfg.launcher.threads_per_process:  # launch/agent.py keeps an OMP_NUM_THREADS it is given
            env["OMP_NUM_THREADS"] = str(cfg.launcher.threads_per_process)
    except (ConfigError, DatasetError) as err:
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
