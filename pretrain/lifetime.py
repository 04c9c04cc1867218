"""Processes that must not outlive the process that started them.

The elastic agent (torchrun, launch/agent.py) starts each worker in a session of its own, so a
`kill -9` of the launcher's process group, or the kernel's out-of-memory killer taking the agent,
leaves the workers training unsupervised, into the same run.dir that a restarted job then writes as
well. A data loader process would likewise linger after its worker. Linux can signal a process when
its parent dies (prctl PR_SET_PDEATHSIG); they ask for SIGKILL, what the agent would have sent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits; True if it will (Linux only).

    expected: the parent's pid, when known. A process that starts slowly (a spawned one imports torch
    first) may find its parent already gone, and itself adopted: it then ends at once."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    if expected is not None and parent != expected:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request: it will never fire
        os.kill(os.getpid(), signal.SIGKILL)
    return True


AGENT_PID_ENV = "PRETRAIN_AGENT_PID"
"""Set by launch/agent.py for its workers: the pid they die with."""


def agent_pid() -> int | None:
    """The pid of the elastic agent that started this worker (launch/agent.py), or None."""
    value = os.environ.get(AGENT_PID_ENV, "")
    return int(value) if value.isdigit() and "TORCHELASTIC_RUN_ID" in os.environ else None
