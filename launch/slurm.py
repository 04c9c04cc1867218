"""launcher=slurm: inside an allocation, one elastic agent per node through `srun`; outside, `sbatch`.

Inside an allocation (SLURM_JOB_ID set, as in slurm/pretrain.sh) every node runs the agent of
launch/agent.py (torchrun) with a c10d rendezvous on the allocation's first node, at a port derived
from the job id unless launcher.rdzv_port is given, so two jobs sharing a node do not collide.
Outside one, slurm/pretrain.sh is submitted with the same overrides; it runs `python -m launch
launcher=slurm ...` again inside the allocation, so both paths build the command here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from launch.local import agent_command
from launch.plan import Plan
from pretrain.config import Config, ConfigError

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "pretrain.sh"
PORT_BASE, PORT_RANGE = 15000, 15000  # below Linux's ephemeral ports (32768+)


def in_allocation() -> bool:
    return "SLURM_JOB_ID" in os.environ


def allocation_nodes() -> int:
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)


def first_node() -> str:
    """The allocation's first host name (`scontrol show hostnames` expands node lists like a[1-4])."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("launch: SLURM_JOB_NODELIST is not set; launcher=slurm inside a job needs SLURM's environment")
    scontrol = shutil.which("scontrol") or "scontrol"
    out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def rdzv_port(cfg: Config, job_id: str) -> int:
    if cfg.launcher.rdzv_port:
        return cfg.launcher.rdzv_port
    return PORT_BASE + int(job_id) % PORT_RANGE


def job_run_name() -> str:
    """<job name>-<job id>: unique per job (two jobs named "pretrain" never share checkpoints) and
    stable across the job's requeues, which keep their id. An array task is <name>-<array id>_<task>."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.environ.get("SLURM_JOB_NAME", "pretrain")) or "pretrain"
    array_id, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_id}_{task}" if array_id and task else os.environ["SLURM_JOB_ID"]
    return f"{name}-{re.sub(r'[^A-Za-z0-9_]', '_', job)}"


def job_overrides(overrides: list[str]) -> list[str]:
    """Inside a job with no run.name/run.dir given, name the run <job name>-<job id>, so a requeued
    job finds its checkpoints in the same run.dir and resumes, and another job never does."""
    if not in_allocation() or any(o.split("=", 1)[0].lstrip("+~") in ("run.name", "run.dir") for o in overrides):
        return overrides
    return [*overrides, f"run.name={job_run_name()}"]


def srun_command(cfg: Config, plan: Plan, overrides: list[str]) -> list[str]:
    job_id = os.environ["SLURM_JOB_ID"]
    endpoint = f"{first_node()}:{rdzv_port(cfg, job_id)}"
    srun = [shutil.which("srun") or "srun", f"--nodes={plan.nnodes}", f"--ntasks={plan.nnodes}",
            "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if os.environ.get("SLURM_CPUS_PER_TASK"):  # srun no longer inherits it from sbatch (22.05+)
        srun.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
    return [*srun, *agent_command(cfg, plan, overrides, endpoint, f"slurm-{job_id}")]


def _passed_to_job(override: str) -> bool:
    """The job runs `launch launcher=slurm`: drop a second launcher selection (Hydra rejects it)."""
    key, _, value = override.partition("=")
    return not (key in ("launcher", "launcher.kind") and value == "slurm")


def sbatch_command(cfg: Config, plan: Plan, overrides: list[str]) -> list[str]:
    launcher = cfg.launcher
    sbatch = [shutil.which("sbatch") or "sbatch", f"--nodes={plan.nnodes}"]
    if launcher.partition:
        sbatch.append(f"--partition={launcher.partition}")
    if launcher.time:
        sbatch.append(f"--time={launcher.time}")
    if cfg.train.device == "cpu":
        sbatch.append("--gpus-per-node=0")  # overrides the script's GPU request
    elif launcher.nproc_per_node != "auto":
        sbatch.append(f"--gpus-per-node={launcher.nproc_per_node}")
    if "," not in sys.executable:  # the job runs the Python this launcher runs in (see slurm/pretrain.sh)
        sbatch.append(f"--export=ALL,PRETRAIN_PYTHON={sys.executable}")
    return [*sbatch, str(SCRIPT), *[o for o in overrides if _passed_to_job(o)]]


def slurm_command(cfg: Config, plan: Plan, overrides: list[str]) -> list[str]:
    """srun inside an allocation, sbatch outside; an argument list, never a shell string."""
    if in_allocation():
        return srun_command(cfg, plan, overrides)
    return sbatch_command(cfg, plan, overrides)
