"""slurm/pretrain.sh on a real (one-node) SLURM: it trains, and a preempted job checkpoints,
requeues itself and resumes to exactly the losses of an uninterrupted job.

The preemption path is SLURM's: `#SBATCH --signal=B:USR1@120` warns the batch shell before the
time limit; here `scancel --signal=USR1 --batch` sends the same signal to the same process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `pytest` without `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import HUNG, TINY  # noqa: E402
from tests.infra.fixtures import slurm_cluster  # noqa: F401,E402  (pytest fixture)

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "pretrain.sh"
STEPS = 300  # ~10 s of training: long enough to be interrupted mid-run
# Threads per worker fixed, not derived from the node: the two jobs compared bit for bit must reduce in
# the same order wherever SLURM places them.
OVERRIDES = [*TINY, f"train.max_steps={STEPS}", "checkpoint.interval=50", "launcher.nproc_per_node=2",
             "launcher.threads_per_process=1"]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def submit(cluster, workdir: Path, run_dir: Path) -> int:
    env = {"PRETRAIN_PYTHON": sys.executable, "PRETRAIN_CACHE": os.environ["PRETRAIN_CACHE"]}
    # The node has no GPUs: override the script's --gpus-per-node, as `launch` does for train.device=cpu.
    return cluster.submit(SCRIPT, args=[*OVERRIDES, f"run.dir={run_dir}"], env=env, workdir=workdir,
                          sbatch_args=["--gpus-per-node=0"])


def job_log(workdir: Path, job: int) -> str:
    return (workdir / f"slurm-{job}.out").read_text(errors="replace")


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory):
    """One job of the tiny model run to the end: the reference for the preemption test.

    Submitted the way users do from a login node, `python -m launch launcher=slurm ...`, which
    runs sbatch on slurm/pretrain.sh and prints the job id.
    """
    workdir = tmp_path_factory.mktemp("slurm-reference")
    run_dir = workdir / "run"
    proc = subprocess.run([sys.executable, "-m", "launch", "launcher=slurm", *OVERRIDES, f"run.dir={run_dir}"],
                          cwd=workdir, capture_output=True, text=True, timeout=HUNG)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = int(re.search(r"Submitted batch job (\d+)", proc.stdout).group(1))
    state = slurm_cluster.wait_for_job(job, timeout=HUNG)  # ~40 s idle, over 4 minutes under load
    log = (workdir / f"pretrain-{job}.out").read_text(errors="replace")  # the script's --output=%x-%j.out
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log[-4000:]}"
    return run_dir, log


def test_sbatch_pretrain_sh_trains_and_checkpoints(uninterrupted):
    run_dir, log = uninterrupted
    assert "srun --nodes=1 --ntasks=1 --ntasks-per-node=1" in log  # went through launch launcher=slurm
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.5, "loss did not fall"
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    assert (run_dir / "checkpoints" / "latest").exists()


def test_preempted_job_requeues_and_resumes_bit_exact(slurm_cluster, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, run_dir)
    try:
        deadline = time.monotonic() + HUNG
        while len(metrics(run_dir)) < 30:  # training is under way
            assert time.monotonic() < deadline, f"job {job} did not start training:\n{slurm_cluster.diagnostics()}"
            assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), job_log(tmp_path, job)
            time.sleep(0.1)
        slurm_cluster.cancel(job, "--signal=USR1", "--batch")
        state = slurm_cluster.wait_for_job(job, timeout=HUNG)
    finally:
        slurm_cluster.cancel(job)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{log[-4000:]}"
    assert slurm_cluster.show_job(job)["Restarts"] == "1", log[-4000:]
    assert "SIGUSR1: stopping the workers" in log and "requeueing" in log
    assert "resuming from" in log
    stopped_at = int(log.split("stopped by signal")[1].split("at step ")[1].split(";")[0])
    assert 30 <= stopped_at < STEPS
    assert f"resuming from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in log  # saved on the signal

    records, expected = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step exactly once
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]  # bit-exact after resume
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()
