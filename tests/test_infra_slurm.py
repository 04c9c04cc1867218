"""The test SLURM cluster works, including the preemption mechanics the training job relies on.

Verified on Slurm 22.05.8 (Debian 12 packages), one node, proctrack/linuxproc, no slurmdbd:

* Delivering SIGUSR1 to a running batch job:
    - ``scancel --signal=USR1 JOBID``          -> job *steps* only (srun tasks). A batch script
      with no steps gets nothing; the bash ``trap`` does NOT run.
    - ``scancel --signal=USR1 --batch JOBID``  (``-b``) -> the batch shell only (not the
      processes it started).
    - ``scancel --signal=USR1 --full JOBID``   (``-f``) -> the batch shell AND all its child
      processes (plus any steps).
    - ``#SBATCH --signal=B:USR1@N`` -> the batch shell only, N seconds before the time limit.
      slurmctld checks time limits every 30 s, so it arrives up to ~30 s late (never after
      the limit for N >= 30). Without ``B:`` it goes to the steps only.
  bash runs a trap only between foreground commands, so the script must wait in the form
  ``cmd & wait $!`` (``wait`` is interrupted by a trapped signal) -- or forward the signal.

* Requeue: ``scontrol requeue JOBID`` (from outside, or from inside the job's trap with
  ``scontrol requeue $SLURM_JOB_ID``) kills the current run (SIGTERM to the batch shell, SIGKILL
  after KillWait) and puts the job back to PENDING; the next run sees ``SLURM_RESTART_COUNT``
  one higher. Needs ``JobRequeue=1`` in slurm.conf (or ``sbatch --requeue``). The requeued job is
  held (Reason=BeginTime) until its launch credential expires: EligibleTime = requeue time +
  cred_expire + 1 s, 121 s by default; slurm.conf here sets ``AuthInfo=cred_expire=5``.
  The output file is truncated on requeue unless ``--open-mode=append``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `pytest` without `python -m`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.infra.fixtures import slurm_cluster  # noqa: F401,E402  (pytest fixture)
from tests.infra.slurm_cluster import ensure_slurm_cluster  # noqa: E402

# Upper bounds on waits (a job to end, a signal to arrive): seconds when idle, far longer on a loaded
# machine; a passing run never waits for them.
WAIT, SIGNAL_WAIT = 600, 120


def _wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sbatch_hello(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    script = "#!/bin/bash\nhostname\necho args=\"$*\" env=$PT_TEST_VAR\nexit 0\n"
    job = slurm_cluster.submit(script, args=["x", "y"], env={"PT_TEST_VAR": "hello"},
                               workdir=tmp_path)
    assert slurm_cluster.wait_for_job(job, timeout=WAIT) == "COMPLETED"
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert slurm_cluster.node in out
    assert "args=x y env=hello" in out
    # Idempotent start: a second ensure reuses the running cluster (same node, still usable).
    again = ensure_slurm_cluster()
    assert again.node == slurm_cluster.node
    print(f"\n[slurm] hello job {job}: {time.monotonic() - t0:.1f}s")


# The batch script the preemption tests use: it records every signal it gets and, like the
# training script will, requeues itself on USR1 during its first run.
SIGNAL_SCRIPT = r"""#!/bin/bash
log="$PT_LOG"
run="${SLURM_RESTART_COUNT:-0}"
echo "start run=$run job=$SLURM_JOB_ID" >> "$log"
on_usr1() {
    echo "usr1 batch run=$run" >> "$log"
    if [ "$PT_SELF_REQUEUE" = 1 ] && [ "$run" = 0 ]; then
        scontrol requeue "$SLURM_JOB_ID"
        echo "requeue rc=$? run=$run" >> "$log"
        # Keep the shell alive until slurmstepd's TERM arrives (as a real job would be saving).
        sleep 30 & wait $!
    fi
}
trap on_usr1 USR1
trap 'echo "term batch run=$run" >> "$log"; exit 143' TERM
if [ "$run" != 0 ] && [ "$PT_EXIT_ON_RESTART" = 1 ]; then
    echo "done run=$run" >> "$log"
    exit 0
fi
# A child process with its own handler, to see which scancel flags reach children.
python3 -c '
import os, signal, sys, time
log = os.environ["PT_LOG"]; run = os.environ.get("SLURM_RESTART_COUNT", "0")
def h(*a):
    open(log, "a").write(f"usr1 child run={run}\n")
signal.signal(signal.SIGUSR1, h)
open(log, "a").write(f"child ready run={run}\n")
time.sleep(120)
' &
for i in $(seq 120); do sleep 1 & wait $!; done
echo "done run=$run" >> "$log"
"""


def test_scancel_signal_and_scontrol_requeue(slurm_cluster, tmp_path):
    """USR1 via scancel (steps / --batch / --full), then an external `scontrol requeue`."""
    t0 = time.monotonic()
    log = tmp_path / "events.log"
    job = slurm_cluster.submit(
        SIGNAL_SCRIPT, env={"PT_LOG": str(log), "PT_EXIT_ON_RESTART": "1"}, workdir=tmp_path,
        sbatch_args=["--requeue", "--open-mode=append"],
    )
    try:
        _signal_then_requeue(slurm_cluster, job, log)
    finally:
        slurm_cluster.cancel(job)  # no-op once it has completed; frees the CPU on failure
    print(f"\n[slurm] scancel --signal / scontrol requeue job {job}: {time.monotonic() - t0:.1f}s")


def _signal_then_requeue(slurm_cluster, job, log):
    _wait_for(lambda: "child ready run=0" in _lines(log), WAIT, "job to start")

    # Plain --signal: steps only; this job has no steps, so nothing arrives.
    slurm_cluster.cancel(job, "--signal=USR1")
    time.sleep(1.5)
    assert not any(l.startswith("usr1") for l in _lines(log)), _lines(log)

    # --batch: the batch shell's trap runs; the child does not get it.
    slurm_cluster.cancel(job, "--signal=USR1", "--batch")
    _wait_for(lambda: "usr1 batch run=0" in _lines(log), SIGNAL_WAIT, "USR1 in batch shell (--batch)")
    time.sleep(1)
    assert "usr1 child run=0" not in _lines(log)

    # --full: batch shell and its children.
    slurm_cluster.cancel(job, "--signal=USR1", "--full")
    _wait_for(lambda: "usr1 child run=0" in _lines(log), SIGNAL_WAIT, "USR1 in child (--full)")
    _wait_for(lambda: _lines(log).count("usr1 batch run=0") == 2, SIGNAL_WAIT, "2nd USR1 in batch shell")
    assert slurm_cluster.job_state(job) == "RUNNING"

    # External requeue: current run gets TERM, the job runs again with SLURM_RESTART_COUNT=1.
    slurm_cluster.requeue(job)
    assert slurm_cluster.wait_for_job(job, timeout=WAIT) == "COMPLETED"
    lines = _lines(log)
    assert "term batch run=0" in lines
    assert "start run=1 job=%d" % job in lines and "done run=1" in lines
    assert slurm_cluster.show_job(job)["Restarts"] == "1"


def test_signal_before_time_limit_then_self_requeue(slurm_cluster, tmp_path):
    """`--signal=B:USR1@N` warns the batch shell; its trap requeues the job, which reruns.

    This is the preemption path of slurm/pretrain.sh: USR1 -> checkpoint -> scontrol requeue ->
    the next run (SLURM_RESTART_COUNT=1) resumes.
    """
    t0 = time.monotonic()
    log = tmp_path / "events.log"
    job = slurm_cluster.submit(
        SIGNAL_SCRIPT,
        env={"PT_LOG": str(log), "PT_SELF_REQUEUE": "1", "PT_EXIT_ON_RESTART": "1"},
        workdir=tmp_path,
        # 1 minute limit (the minimum), warning 55 s before it: arrives at the first time-limit
        # check (every 30 s) after t=5 s.
        sbatch_args=["--time=1", "--signal=B:USR1@55", "--requeue", "--open-mode=append"],
    )
    try:
        assert slurm_cluster.wait_for_job(job, timeout=WAIT) == "COMPLETED"
    finally:
        slurm_cluster.cancel(job)
    lines = _lines(log)
    assert lines.index("usr1 batch run=0") < lines.index("requeue rc=0 run=0")
    assert "usr1 child run=0" not in lines  # B: reaches the batch shell only
    assert "start run=1 job=%d" % job in lines and "done run=1" in lines
    assert slurm_cluster.show_job(job)["Restarts"] == "1"
    print(f"\n[slurm] --signal=B:USR1@55 + self requeue job {job}: {time.monotonic() - t0:.1f}s")
