"""A real one-node SLURM cluster on this machine, for tests.

Started from the Debian packages (``slurmctld slurmd slurm-client munge``, installed by
``.ci/install_system_deps.sh``). Needs root: it writes ``/etc/slurm/slurm.conf`` (the standard
location, so ``sbatch``/``squeue``/``scontrol`` work for everyone without ``SLURM_CONF``) and
starts ``munged``, ``slurmctld`` and ``slurmd`` as daemons.

No pytest in here; the pytest fixture lives in ``tests/infra/fixtures.py``.

Usage::

    from tests.infra.slurm_cluster import ensure_slurm_cluster
    cluster = ensure_slurm_cluster()            # idempotent: reuses a healthy running cluster
    job = cluster.submit("#!/bin/bash\\necho hi\\n", workdir=tmp)
    assert cluster.wait_for_job(job, timeout=60) == "COMPLETED"

State tracking works without slurmdbd (``AccountingStorageType=accounting_storage/none``):
``scontrol show job`` while the job record is kept (``MinJobAge``), then the job-completion log
written by ``JobCompType=jobcomp/filetxt``; ``sacct`` is only tried if accounting is configured.

Preemption mechanics checked here (Slurm 22.05.8, Debian 12) -- see tests/test_infra_slurm.py:
  * ``sbatch --signal=B:USR1@N`` delivers SIGUSR1 to the batch shell only, N seconds before the
    time limit (with up to ~30 s of slack: slurmctld checks time limits every 30 s).
    Without ``B:`` the signal goes to the job *steps* (srun-launched tasks) only.
  * ``scancel --signal=USR1 --batch JOBID`` (``-b``): batch shell only (not its children).
    ``scancel --signal=USR1 --full JOBID`` (``-f``): batch shell *and* all its child processes
    (and steps). Plain ``scancel --signal=USR1 JOBID``: steps only -- never reaches the batch
    script, so a bash ``trap`` does not run.
  * ``scontrol requeue JOBID`` (from inside the job or outside) kills the running job and puts it
    back to PENDING; the next run sees ``SLURM_RESTART_COUNT`` incremented. Needs ``JobRequeue=1``
    (or ``sbatch --requeue``). Slurm holds a requeued job for a short while before it is eligible
    again (its BeginTime is pushed into the future); the helper does not change that.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "munged")

CONF_DIR = Path("/etc/slurm")
CONF_PATH = CONF_DIR / "slurm.conf"
CONF_MARKER = "# managed by pretrain tests/infra/slurm_cluster.py"
STATE_DIR = Path("/var/lib/slurm/slurmctld")
SPOOL_DIR = Path("/var/lib/slurm/slurmd")
LOG_DIR = Path("/var/log/slurm")
JOBCOMP_LOG = LOG_DIR / "jobcomp.log"
SLURMCTLD_PID = Path("/run/slurmctld.pid")
SLURMD_PID = Path("/run/slurmd.pid")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
MUNGE_SOCKET = MUNGE_RUN / "munge.socket.2"
MUNGE_PID = MUNGE_RUN / "munged.pid"
MUNGE_LOG_DIR = Path("/var/log/munge")
MUNGE_LIB_DIR = Path("/var/lib/munge")

CLUSTER_NAME = "pretrain-test"
PARTITION = "debug"
# Kept short so that finished jobs do not pile up, long enough for wait_for_job to see the final
# state via `scontrol show job`; after that the jobcomp log answers.
MIN_JOB_AGE = 120
CRED_EXPIRE = 5

TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})


class SlurmError(RuntimeError):
    pass


def slurm_available() -> bool:
    """True when the SLURM and munge binaries are installed."""
    return all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in SLURM_BINARIES)


def missing_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _run(cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} failed (rc={p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # Zombies / recycled pids: check the command name.
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    if not any(n in comm for n in ("slurm", "munge")):
        return None
    return pid


def _proc_running(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _stop_pidfile(pidfile: Path, timeout: float = 15) -> None:
    """Stop the daemon whose pid is in pidfile (only that pid), waiting for it to exit.

    Waits on the process itself, not the pidfile: slurmctld removes its pidfile before it has
    finished shutting down (and released its port).
    """
    pid = _pid_alive(pidfile)
    if pid is None:
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _proc_running(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _proc_running(pid):
        time.sleep(0.1)


def _node_hardware() -> tuple[str, dict[str, str]]:
    """(NodeName, attributes) from `slurmd -C`, which reports the real CPUs and memory."""
    out = _run([_bin("slurmd"), "-C"]).stdout
    line = next(l for l in out.splitlines() if l.startswith("NodeName="))
    attrs = dict(kv.split("=", 1) for kv in line.split())
    name = attrs.pop("NodeName")
    return name, attrs


def render_conf() -> tuple[str, str]:
    """Return (node name, slurm.conf text) for this machine."""
    host = socket.gethostname().split(".")[0]
    node, hw = _node_hardware()
    if node != host:  # slurmd -C uses the short hostname too; be explicit anyway
        node = host
    # Leave a little memory headroom: if RealMemory exceeds what slurmd measures at start the
    # node is drained ("Low RealMemory").
    real_mem = max(1, int(int(hw.get("RealMemory", "1024")) * 0.95))
    node_line = (
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={hw['CPUs']} Boards={hw.get('Boards', 1)} "
        f"SocketsPerBoard={hw.get('SocketsPerBoard', 1)} CoresPerSocket={hw.get('CoresPerSocket', hw['CPUs'])} "
        f"ThreadsPerCore={hw.get('ThreadsPerCore', 1)} RealMemory={real_mem} State=UNKNOWN"
    )
    lines = [
        CONF_MARKER,
        f"ClusterName={CLUSTER_NAME}",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        # A requeued batch job is held until its launch credential expires (EligibleTime =
        # requeue + cred_expire + 1 s; default 120 s). Keep that short for tests.
        f"AuthInfo=cred_expire={CRED_EXPIRE}",
        "CredType=cred/munge",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        # Completion records survive the job leaving slurmctld's memory (no slurmdbd here).
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={JOBCOMP_LOG}",
        "SelectType=select/cons_tres",
        # Cores are the consumable; memory is not (with CR_Core_Memory and no DefMemPerCPU every
        # job would be given all of the node's memory, so jobs could only run one at a time).
        "SelectTypeParameters=CR_Core",
        # Never drain the node because the measured hardware differs from the NodeName line.
        "SlurmdParameters=config_overrides",
        "SchedulerType=sched/backfill",
        # Fast scheduling: try to start jobs on every submit/completion, no batching delay.
        "SchedulerParameters=sched_interval=2,sched_min_interval=0,batch_sched_delay=0,"
        "bf_interval=1,defer_batch=0",
        # Preemption / requeue: `scontrol requeue` and --requeue need JobRequeue=1.
        "JobRequeue=1",
        # Finished jobs stay visible in `scontrol show job` for MinJobAge seconds.
        f"MinJobAge={MIN_JOB_AGE}",
        "MaxJobCount=10000",
        # Seconds between SIGTERM and SIGKILL when a job is cancelled/requeued/times out.
        "KillWait=10",
        "OverTimeLimit=0",
        "InactiveLimit=0",
        "Waittime=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
        # A node that comes back after slurmd restarts returns to service by itself.
        "ReturnToService=2",
        "SlurmctldPort=6817",
        "SlurmdPort=6818",
        f"StateSaveLocation={STATE_DIR}",
        f"SlurmdSpoolDir={SPOOL_DIR}",
        f"SlurmctldPidFile={SLURMCTLD_PID}",
        f"SlurmdPidFile={SLURMD_PID}",
        f"SlurmctldLogFile={LOG_DIR / 'slurmctld.log'}",
        f"SlurmdLogFile={LOG_DIR / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        node_line,
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP "
        "OverSubscribe=NO",
        "",
    ]
    return node, "\n".join(lines)


@dataclass
class SlurmCluster:
    node: str
    partition: str = PARTITION
    conf_path: Path = CONF_PATH
    env: dict[str, str] = field(default_factory=dict)  # extra env for client tools (SLURM_CONF)

    # ---- client commands -------------------------------------------------------------------
    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        e = dict(os.environ)
        e.update(self.env)
        if extra:
            e.update({k: str(v) for k, v in extra.items()})
        return e

    def run(self, cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return _run(cmd, check=check, timeout=timeout, env=self._env())

    def submit(
        self,
        script: str | os.PathLike,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        workdir: str | os.PathLike | None = None,
        sbatch_args: list[str] | tuple[str, ...] = (),
    ) -> int:
        """Submit a batch job and return its id.

        script: a path to a batch script, or the script text itself (anything containing a
        newline is treated as text and written to ``workdir``). args: arguments to the script.
        env: extra environment for the job (on top of the caller's; ``--export=ALL``).
        workdir: the job's working directory (default: a fresh temp dir); output goes to
        ``workdir/slurm-<jobid>.out`` unless the script or sbatch_args say otherwise.
        """
        wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="pt-slurm-"))
        wd.mkdir(parents=True, exist_ok=True)
        if isinstance(script, str) and "\n" in script:
            fd, path = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=wd)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            os.chmod(path, 0o755)
            script_path = path
        else:
            script_path = str(Path(script).resolve())
        cmd = [
            _bin("sbatch"), "--parsable", f"--chdir={wd}", "--export=ALL",
            f"--output={wd / 'slurm-%j.out'}", *sbatch_args, script_path, *map(str, args),
        ]
        p = _run(cmd, env=self._env(env))
        job = p.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise SlurmError(f"unexpected sbatch output: {p.stdout!r} {p.stderr!r}")
        return int(job)

    def show_job(self, job_id: int) -> dict[str, str] | None:
        """`scontrol show job` as a dict, or None once the job has left slurmctld's memory."""
        p = self.run([_bin("scontrol"), "show", "job", "-o", str(job_id)], check=False)
        if p.returncode != 0 or "JobId=" not in p.stdout:
            return None
        rec: dict[str, str] = {}
        for m in re.finditer(r"(\S+?)=(\S*)", p.stdout.strip()):
            rec.setdefault(m.group(1), m.group(2))
        return rec

    def _jobcomp_state(self, job_id: int) -> str | None:
        try:
            text = JOBCOMP_LOG.read_text(errors="replace")
        except OSError:
            return None
        state = None
        for line in text.splitlines():
            if re.search(rf"\bJobId={job_id}\b", line):
                m = re.search(r"\bJobState=(\S+)", line)
                if m:
                    state = m.group(1)
        return state

    def _sacct_state(self, job_id: int) -> str | None:
        if not shutil.which("sacct"):
            return None
        p = self.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)], check=False)
        if p.returncode != 0 or not p.stdout.strip():
            return None
        return p.stdout.strip().splitlines()[-1].split()[0]

    def job_state(self, job_id: int) -> str:
        """Current state (PENDING, RUNNING, COMPLETED, ...) or UNKNOWN."""
        rec = self.show_job(job_id)
        if rec is not None:
            return rec.get("JobState", "UNKNOWN")
        return self._jobcomp_state(job_id) or self._sacct_state(job_id) or "UNKNOWN"

    def wait_for_job(self, job_id: int, timeout: float = 120, poll: float = 0.5,
                     states: frozenset[str] | set[str] = TERMINAL_STATES) -> str:
        """Poll until the job reaches one of ``states`` (default: a terminal state); return it.

        A requeued job passes through REQUEUED/PENDING, which are not terminal, so this waits for
        the final run. Raises TimeoutError with the job record and log tails on timeout.
        """
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} still {state} after {timeout}s\n{self.show_job(job_id)}\n"
            f"{self.diagnostics()}"
        )

    def cancel(self, job_id: int, *flags: str) -> None:
        self.run([_bin("scancel"), *flags, str(job_id)], check=False)

    def requeue(self, job_id: int) -> None:
        self.run([_bin("scontrol"), "requeue", str(job_id)])

    def node_state(self) -> str:
        p = self.run([_bin("sinfo"), "-h", "-N", "-n", self.node, "-o", "%T"], check=False)
        return p.stdout.strip().lower()

    def diagnostics(self) -> str:
        parts = []
        for cmd in ([_bin("sinfo"), "-N", "-l"], [_bin("squeue"), "-l"]):
            p = self.run(cmd, check=False)
            parts.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
        for log in ("slurmctld.log", "slurmd.log"):
            try:
                tail = (LOG_DIR / log).read_text(errors="replace").splitlines()[-20:]
            except OSError:
                tail = []
            parts.append(f"--- {log} (tail)\n" + "\n".join(tail))
        return "\n".join(parts)

    def teardown(self) -> None:
        """Stop slurmd and slurmctld (and munged if we find it). Only our pidfiles' processes."""
        _stop_pidfile(SLURMD_PID)
        _stop_pidfile(SLURMCTLD_PID)
        if _pid_alive(MUNGE_PID):
            _run([_bin("munged"), "--stop"], check=False)
            _stop_pidfile(MUNGE_PID)


# ---- start-up ---------------------------------------------------------------------------------

def _ensure_munge() -> None:
    for d, mode in ((MUNGE_RUN, 0o755), (MUNGE_LOG_DIR, 0o700), (MUNGE_LIB_DIR, 0o700),
                    (MUNGE_KEY.parent, 0o700)):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, mode)
        shutil.chown(d, "munge", "munge")
    if not MUNGE_KEY.exists() or MUNGE_KEY.stat().st_size < 32:
        MUNGE_KEY.write_bytes(os.urandom(1024))
    os.chmod(MUNGE_KEY, 0o400)
    shutil.chown(MUNGE_KEY, "munge", "munge")
    if _munge_ok():
        return
    _stop_pidfile(MUNGE_PID)
    if MUNGE_SOCKET.exists():
        MUNGE_SOCKET.unlink()
    # munged refuses to run as root; run it as the munge user like systemd does.
    _run(["runuser", "-u", "munge", "--", _bin("munged")])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _munge_ok():
            return
        time.sleep(0.1)
    raise SlurmError("munged did not come up")


def _munge_ok() -> bool:
    if not MUNGE_SOCKET.exists():
        return False
    try:
        m = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        if m.returncode != 0:
            return False
        u = subprocess.run(["unmunge"], input=m.stdout, capture_output=True, timeout=5)
        return u.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _write_conf() -> tuple[str, bool]:
    """Write /etc/slurm/slurm.conf; return (node, changed)."""
    node, text = render_conf()
    if CONF_PATH.exists():
        old = CONF_PATH.read_text()
        if not old.startswith(CONF_MARKER):
            raise SlurmError(
                f"{CONF_PATH} exists and was not written by tests/infra/slurm_cluster.py; "
                "refusing to overwrite a real cluster's configuration"
            )
        if old == text:
            return node, False
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CONF_PATH.with_suffix(".conf.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    tmp.replace(CONF_PATH)
    return node, True


def _ctld_up(cluster: SlurmCluster) -> bool:
    p = cluster.run([_bin("scontrol"), "ping"], check=False, timeout=15)
    return p.returncode == 0 and "is UP" in p.stdout


def _wait(pred, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise SlurmError(f"timed out waiting for {what}\n{cluster.diagnostics()}")


def _node_usable(state: str) -> bool:
    # A trailing flag ("idle*" = not responding, "~" powered off, ...) means not usable yet.
    return state in ("idle", "mixed", "allocated", "completing")


def _resume_node(cluster: SlurmCluster) -> None:
    state = cluster.node_state()
    if any(k in state for k in ("down", "drain", "fail")):
        cluster.run([_bin("scontrol"), "update", f"nodename={cluster.node}", "state=resume"],
                    check=False)


def ensure_slurm_cluster(timeout: float = 60) -> SlurmCluster:
    """Start (or reuse) a one-node SLURM cluster on this machine and return a handle to it.

    Idempotent: if munged, slurmctld and slurmd are running with the current configuration and
    the node is usable, nothing is restarted. A node left down/drained (e.g. after a daemon
    restart) is resumed.
    """
    if not slurm_available():
        raise SlurmError(f"SLURM binaries missing: {missing_binaries()} "
                         "(run .ci/install_system_deps.sh)")
    if os.geteuid() != 0:
        raise SlurmError("starting a SLURM cluster needs root")

    node, changed = _write_conf()
    cluster = SlurmCluster(node=node)
    for d in (STATE_DIR, SPOOL_DIR, LOG_DIR):
        d.mkdir(parents=True, exist_ok=True)
    _ensure_munge()

    ctld_pid, slurmd_pid = _pid_alive(SLURMCTLD_PID), _pid_alive(SLURMD_PID)
    if changed:
        # New configuration: restart both daemons (a reconfigure cannot change node hardware).
        _stop_pidfile(SLURMD_PID)
        _stop_pidfile(SLURMCTLD_PID)
        ctld_pid = slurmd_pid = None
    if ctld_pid is None or not _ctld_up(cluster):
        _stop_pidfile(SLURMCTLD_PID)
        # Keep saved state (jobs, node state) across restarts; -i ignores unreadable state.
        _run([_bin("slurmctld"), "-i"], timeout=30)
        _wait(lambda: _ctld_up(cluster), timeout, "slurmctld (scontrol ping)", cluster)
    if slurmd_pid is None:
        _run([_bin("slurmd")], timeout=30)
        _wait(lambda: _pid_alive(SLURMD_PID) is not None, timeout, "slurmd pid", cluster)

    def ready() -> bool:
        st = cluster.node_state()
        if _node_usable(st):
            return True
        _resume_node(cluster)
        return False

    _wait(ready, timeout, f"node {node} idle in sinfo", cluster)
    return cluster


def teardown_slurm_cluster() -> None:
    """Stop the daemons started by ensure_slurm_cluster (leaves config and state on disk)."""
    SlurmCluster(node=socket.gethostname().split(".")[0]).teardown()


if __name__ == "__main__":  # python -m tests.infra.slurm_cluster [stop]
    import sys

    if sys.argv[1:] == ["stop"]:
        teardown_slurm_cluster()
    else:
        c = ensure_slurm_cluster()
        print(f"SLURM cluster up: node {c.node}, partition {c.partition}, state {c.node_state()}")
