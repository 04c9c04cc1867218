"""A worker's one-line fatal error, printed once per job rather than once per rank.

Every rank usually meets the same bad value or dataset, and would print the same line at the same
moment into one terminal (two ranks' lines can even interleave). Under launch's agent
(launch/agent.py sets PRETRAIN_ERRORS_DIR) each rank leaves its line in that directory instead, and
the agent prints each distinct line once, lowest rank first, after the workers have exited. A line
that only one rank meets (its own shard, its own checkpoint file) is printed all the same. Without
the agent (plain torchrun, one process) the line goes straight to stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ERRORS_DIR_ENV = "PRETRAIN_ERRORS_DIR"


def report(message: str) -> None:
    """Print `message` (to stderr), or hand it to the agent that started this worker."""
    directory = os.environ.get(ERRORS_DIR_ENV)
    if directory:
        path = Path(directory) / f"rank-{int(os.environ.get('RANK', '0')):06d}.txt"
        try:
            partial = path.with_suffix(".partial")
            partial.write_text(message)
            partial.replace(path)  # the agent never reads half a line
            return
        except OSError:
            pass  # the agent's directory is gone: print it here rather than lose it
    print(message, file=sys.stderr, flush=True)


def collected(directory: str | Path) -> list[str]:
    """The distinct lines the ranks left in `directory`, in the order of the lowest rank that left each."""
    lines: list[str] = []
    for path in sorted(Path(directory).glob("rank-*.txt")):
        line = path.read_text().strip()
        if line and line not in lines:
            lines.append(line)
    return lines
