"""`python -m launch.agent <torchrun arguments>`: torch's elastic agent (torchrun), with four changes.

* SIGUSR1 (SLURM's warning before a time limit or a preemption) is passed on to the workers, which
  checkpoint and exit 0; the agent keeps running and then exits 0 as after any finished run.
  Plain torchrun dies of SIGUSR1 (its default action), and with it the workers, unsaved.
  SIGTERM/SIGINT/HUP/QUIT keep torchrun's own handling: it passes them on, waits
  --shutdown_timeout seconds, then kills the workers.
* A rendezvous that cannot form fails with one line naming its endpoint, instead of a bare
  RendezvousTimeoutError traceback.
* The workers die with the agent (pretrain.lifetime): torchrun starts them in sessions of their
  own, so a kill -9 of the agent would leave them training into the run directory.
* Workers that stop on bad input (exit code 2) leave their one line with the agent
  (pretrain.fatal); it prints each distinct line once and exits 2, without torchrun's
  ChildFailedError report. A worker that crashes prints its own traceback; the agent adds one
  line naming it and exits 1.

Everything else, arguments included, is torchrun's.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from pretrain import fatal, lifetime

# What torchrun logs when a worker exits early: the closing signal sent to the others and the first
# failure. The agent says it in one line of its own (main), after the workers' own messages.
_WORKER_EXIT_LOGS = ("Sending process %s closing signal %s", "failed (exitcode: %s) local_rank: %s")


def _children() -> list[int]:
    """Direct children of this process: the workers (torchrun starts them with subprocess)."""
    me, pids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            pids.append(int(stat.parent.name))
    return pids


def _pass_on(signum: int, frame: object) -> None:
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _option(argv: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def _quiet_worker_exits(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_WORKER_EXIT_LOGS)


def _failure_line(rank: int, failure) -> str:
    """One line naming the worker that failed first (a crash prints its own traceback above it)."""
    if failure.exitcode >= 0:
        return f"launch: rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}; its traceback is above"
    signal_name = failure.signal_name()
    why = " (by the kernel's out-of-memory killer, if no one sent it)" if signal_name == "SIGKILL" else ""
    return f"launch: rank {rank} (pid {failure.pid}) was killed by {signal_name}{why}; the other ranks were stopped"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main as torchrun

    signal.signal(signal.SIGUSR1, _pass_on)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_quiet_worker_exits)
    errors_dir = tempfile.mkdtemp(prefix="pretrain-errors-")
    os.environ[fatal.ERRORS_DIR_ENV] = errors_dir
    os.environ[lifetime.AGENT_PID_ENV] = str(os.getpid())  # the workers die with this process
    # By default the workers of every restart share the rendezvous's TCPStore, where the previous
    # group's keys remain: after an elastic restart gloo then connects to the dead workers'
    # addresses ("Gloo connectFullMesh failed ... Connection refused"). A store per attempt avoids it,
    # but its port is one the agent found free and let go, which worker rank 0 binds seconds later: on
    # a busy host another socket can take it in between (EADDRINUSE). So only runs that can restart get
    # a store per attempt (where that race costs one restart); the others share the agent's store,
    # which already listens.
    if _option(argv, "max_restarts", "0") not in ("", "0"):
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun would set 1 thread per worker (with a warning banner); give each worker its share of
    # this node's cores instead, which is what a CPU run needs and harmless on GPU nodes.
    nproc = _option(argv, "nproc_per_node", "1")
    if "OMP_NUM_THREADS" not in os.environ and nproc.isdigit():
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(nproc)))
    try:
        torchrun(argv)
    except RendezvousError as err:
        endpoint = _option(argv, "rdzv_endpoint", "?")
        nnodes = _option(argv, "nnodes", "?")
        timeout = _option(argv, "rdzv_conf", "").partition("join_timeout=")[2].split(",")[0] or "?"
        print(f"launch: rendezvous at {endpoint} failed ({type(err).__name__}): {nnodes} node(s) did not all "
              f"join within {timeout}s. Check that every node started its launcher, that {endpoint} is "
              "reachable from each node, and launcher.rdzv_timeout.", file=sys.stderr, flush=True)
        return 1
    except ChildFailedError as err:
        for line in fatal.collected(errors_dir):
            print(line, file=sys.stderr, flush=True)
        rank, failure = err.get_first_failure()
        if failure.exitcode == 2:  # bad input, already said in one line
            return 2
        print(_failure_line(rank, failure), file=sys.stderr, flush=True)
        return 1
    finally:
        shutil.rmtree(errors_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
