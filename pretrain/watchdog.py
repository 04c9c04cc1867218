"""The hang watchdog: a rank that finishes no step within train.hang_timeout seconds exits non-zero.

A hung collective or a stuck data read otherwise holds a whole job (hundreds of GPUs) until the
scheduler's time limit. Every rank runs its own watchdog thread: when the main loop has not called
`beat()` for `timeout` seconds, it writes every thread's Python stack (faulthandler, which needs no
lock the stuck thread may hold) to <run.dir>/hang-rank<R>.txt, says so on stderr and ends the
process with EXIT_CODE, so the launcher's restart policy (launcher.max_restarts) applies. The other
ranks stop making progress too (they wait in a collective for the hung one), so their watchdogs
fire within a poll or two of the first. The launcher kills every worker as soon as one exits, so a
rank that has dumped waits EXIT_GRACE seconds before exiting: by then the others have dumped too,
and the files show where each rank was.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

EXIT_CODE = 3
EXIT_GRACE = 10.0
"""Seconds between a rank's dump and its exit. The other ranks last beat when the same step's final
collective returned and their watchdogs poll every second, so they dump within this, even on a busy host."""


class HangWatchdog:
    def __init__(self, timeout: float, run_dir: str | Path, rank: int) -> None:
        self.timeout, self.rank = timeout, rank
        self.grace = min(EXIT_GRACE, timeout)
        self.path = Path(run_dir) / f"hang-rank{rank}.txt"
        self._last = time.monotonic()
        self._what = "start"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HangWatchdog:
        if self.timeout > 0:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, what: str) -> None:
        """Progress was made (`what` finished); the timeout starts again."""
        self._last, self._what = time.monotonic(), what

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle >= self.timeout:
                self._dump(idle)

    def _dump(self, idle: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(f"rank {self.rank}: no progress for {idle:.0f}s (train.hang_timeout={self.timeout:g}) "
                    f"after {self._what}; Python stacks of every thread:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        print(f"rank {self.rank}: hang detected: no step finished in {idle:.0f}s after {self._what} "
              f"(train.hang_timeout={self.timeout:g}); stacks in {self.path}; exiting with status {EXIT_CODE} "
              f"in {self.grace:g}s", file=sys.stderr, flush=True)
        time.sleep(self.grace)
        os._exit(EXIT_CODE)  # the main thread is stuck: nothing else would end the process
