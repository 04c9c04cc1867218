"""Profiling a window of training steps: a torch profiler Chrome trace per rank (and a CUDA memory
snapshot on GPU) in <run.dir>/profile/, so a slow or memory-hungry step can be looked at in
chrome://tracing / Perfetto and https://pytorch.org/memory_viz without changing the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """Profiles optimizer steps first..last (1-based, inclusive); does nothing when steps is empty.

    The loop calls before_step(n) and after_step(n) around step n. A resumed run that starts past
    the window does not profile.
    """

    def __init__(self, steps: Optional[list[int]], run_dir: str, rank: int, device: torch.device) -> None:
        self.first, self.last = (steps[0], steps[-1]) if steps else (0, -1)
        self.dir = Path(run_dir) / "profile"
        self.rank, self.device = rank, device
        self._prof: Optional[profile] = None

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False)
        self._prof.__enter__()

    def after_step(self, step: int) -> None:
        if self._prof is None or step != self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        name = f"steps_{self.first}-{self.last}_rank{self.rank}"
        self._prof.export_chrome_trace(str(self.dir / f"trace_{name}.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.dir / f"top_ops_{name}.txt").write_text(self._prof.key_averages().table(sort_by=sort, row_limit=20))
        if self.device.type == "cuda":
            # torch's own snapshot format (a pickle), read by its memory_viz tool, never by this project.
            torch.cuda.memory._dump_snapshot(str(self.dir / f"memory_{name}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self._prof = None
