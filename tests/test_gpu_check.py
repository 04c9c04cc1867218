"""tools/gpu_check.py on a machine without a GPU: one clear line, and the way it runs the `gpu` tests."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from gpu_check import pytest_command  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_a_gpu_it_says_so_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); run this on a GPU machine"]


def test_gpu_tests_spread_test_by_test_over_the_workers() -> None:
    # Most gpu tests live in one module; the suite's usual scheduling keeps a module on one worker.
    # Without a GPU they skip, but which worker took each is still reported.
    command = [*pytest_command(workers=3, timeout=100), "-vv", "tests/test_gpu.py"]  # -vv: its -q undone, names shown
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    workers = defaultdict(list)
    for worker, test in re.findall(r"^\[(gw\d+)\].*? (?:PASSED|SKIPPED|FAILED) (tests/test_gpu.py::\S+)",
                                   proc.stdout, re.M):
        workers[worker].append(test)
    assert sum(map(len, workers.values())) >= 10
    assert len(workers) == 3, dict(workers)


def test_benchmark_parts_are_commands_the_benchmark_accepts_within_8_minutes() -> None:
    """Each benchmark command gpu_check runs parses as tools/benchmark.py's arguments (a typo would
    only show on a GPU), and the default limits of all parts add up to under 8 minutes."""
    from benchmark import parse_args as benchmark_args
    from gpu_check import benchmark_parts, parse_args

    a = parse_args([])
    (first, ratios, _), (second, global_batch, _) = benchmark_parts(a)
    assert "seq 2048" in first and "8 micro-batches" in second
    ours = benchmark_args(ratios[2:])  # after python and the script
    assert (ours.preset, ours.seq_len, ours.precision, ours.grad_accum, ours.profile) == ("1b", 2048, "bf16", 1, 2)
    assert ours.references == "transformers,eager,megatron"
    alone = benchmark_args(global_batch[2:])
    assert (alone.preset, alone.grad_accum, alone.references) == ("1b", 8, "")
    limits = a.test_timeout + a.launch_timeout + sum(limit for _, _, limit in benchmark_parts(a))
    assert limits < 8 * 60, limits
    assert [name for name, _, _ in benchmark_parts(parse_args(["--global-batch-accum", "0"]))] == [first]
