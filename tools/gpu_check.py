"""One command for a machine with one CUDA GPU: the `gpu` tests, then a short bf16 benchmark.

    python tools/gpu_check.py                 # under 8 minutes (7m50s at most)
    python tools/gpu_check.py --skip-tests    # benchmark only

It runs `pytest -m gpu` (on several workers where pytest-xdist is installed, each test under a time
limit where pytest-timeout is), then the README's default training job for a few steps on the GPU
(`python -m launch`: torchrun, NCCL, bf16, compiled blocks), then `tools/benchmark.py --preset 1b
--seq-len 2048 --precision bf16 --steps N --json --profile 2`, and prints the benchmark's MFU, its
ratios against the references measured in the same run, and where pretrain's step goes (its busiest
kernels, and how much of the step the GPU was busy). Last, the same benchmark of pretrain alone over 8
micro-batches a step (`--grad-accum 8`), the MFU of a run with a real global batch. Each part has a
hard time limit; a part that fails or runs out of time is reported in one line and the others still
run. Exit status 0 only if every part passed.

Dependencies that the machine lacks (deepspeed, megatron-core, hydra-core, webdataset) can come
from a wheelhouse installed offline to a directory on PYTHONPATH; this script passes its own
environment, PYTHONPATH included, to both parts.
"""

from __future__ import annotations

import argparse
import json
import os
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_part(name: str, command: list[str], timeout: float) -> tuple[bool, str]:
    """Run one part with a hard limit; return (passed, its stdout). Output streams to the console."""
    print(f"== {name}: {' '.join(command)} (limit {timeout:.0f} s)", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, timeout=timeout, stdout=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        print(out, flush=True)
        print(f"== {name}: FAILED, still running after {timeout:.0f} s (killed)", flush=True)
        return False, out
    print(proc.stdout, flush=True)
    ok = proc.returncode == 0
    print(f"== {name}: {'passed' if ok else f'FAILED (exit {proc.returncode})'} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return ok, proc.stdout


def pytest_command(workers: int, timeout: float) -> list[str]:
    """`pytest -m gpu`, spread test by test over `workers` (tests/conftest.py) where pytest-xdist is
    installed: each test is short and small, and the GPU has room for several at once."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
               "--continue-on-collection-errors", "--durations=10"]
    if not importlib.util.find_spec("xdist"):
        command += ["-o", "addopts="]  # pyproject.toml's addopts name pytest-xdist's options
    else:
        command += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout"):  # a hung NCCL collective fails its test, not the check
        command += [f"--timeout={int(timeout * 0.8)}"]
    return command


def last_json(text: str) -> dict | None:
    """The benchmark's --json object: the last JSON object its output ends with (one line or indented)."""
    lines = text.strip().splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].startswith("{"):
            try:
                return json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                continue
    return None


def summarize(result: dict) -> list[str]:
    """MFU and every ratio the benchmark reports, whatever its exact key names."""
    lines = []
    for key, value in sorted(result.items()):
        if isinstance(value, (int, float)) and ("mfu" in key.lower() or "ratio" in key.lower()
                                                or "tokens_per_sec" in key.lower()):
            shown = f"{100 * value:.1f}%" if "mfu" in key.lower() and value <= 1.5 else f"{value:,.2f}"
            lines.append(f"   {key}: {shown}")
        elif key in ("device", "precision_mode", "attention"):  # what the numbers were measured with
            lines.append(f"   {key}: {value}")
        elif isinstance(value, dict):
            lines += [f"   {key}.{line.strip()}" for line in summarize(value)]
    return lines


def benchmark_parts(a: argparse.Namespace) -> list[tuple[str, list[str], float]]:
    """(name, command, time limit) of each benchmark run: pretrain against the references at one
    micro-batch a step (the ratios, comparable with earlier runs), then pretrain alone over
    --global-batch-accum micro-batches a step, whose MFU is the one a run with a real global batch
    sees (the optimizer step spread over all its micro-batches)."""
    common = [sys.executable, "tools/benchmark.py", "--preset", "1b", "--seq-len", "2048", "--precision", "bf16",
              "--json"]
    parts = [("benchmark 1b bf16 seq 2048", [*common, "--steps", str(a.steps), "--grad-accum", str(a.grad_accum),
                                             "--profile", str(a.profile_steps)], a.bench_timeout)]
    if a.global_batch_accum:
        parts.append((f"benchmark 1b, {a.global_batch_accum} micro-batches a step",
                      [*common, "--steps", "4", "--grad-accum", str(a.global_batch_accum), "--references", ""],
                      a.global_batch_timeout))
    return parts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test-timeout", type=float, default=200, help="seconds for pytest -m gpu")
    p.add_argument("--test-workers", type=int, default=8, help="pytest-xdist workers sharing the GPU (0: none)")
    p.add_argument("--launch-timeout", type=float, default=80, help="seconds for the default training job")
    p.add_argument("--launch-steps", type=int, default=100, help="steps of the default training job")
    p.add_argument("--bench-timeout", type=float, default=130, help="seconds for the benchmark")
    p.add_argument("--steps", type=int, default=10, help="timed benchmark steps")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per benchmark step (8 or more: the MFU of a real global batch)")
    p.add_argument("--profile-steps", type=int, default=2,
                   help="pretrain steps the benchmark profiles after timing (0: none): top kernels, device busy share")
    p.add_argument("--global-batch-accum", type=int, default=8, metavar="N",
                   help="micro-batches a step of the second, pretrain-only benchmark (0: skip it)")
    p.add_argument("--global-batch-timeout", type=float, default=60, help="seconds for that benchmark")
    p.add_argument("--skip-tests", action="store_true", help="skip pytest -m gpu (the job and benchmark still run)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not importable; install a CUDA build of torch first", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); run this on a GPU machine",
              file=sys.stderr)
        return 2
    print(f"gpu_check: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, Python {sys.version.split()[0]}", flush=True)

    # One embedded corpus for the tests' workers and the training job (built once, under a file lock).
    os.environ.setdefault("PRETRAIN_TEST_CACHE", os.path.join(tempfile.gettempdir(), "pretrain-gpu-check-cache"))
    os.environ.setdefault("PRETRAIN_CACHE", os.environ["PRETRAIN_TEST_CACHE"])
    results: dict[str, bool] = {}
    if not a.skip_tests:
        results["gpu tests"], _ = run_part("gpu tests", pytest_command(a.test_workers, a.test_timeout),
                                           a.test_timeout)
    with tempfile.TemporaryDirectory() as run_dir:  # a check writes no Weights & Biases run
        results["default job"], _ = run_part(
            "default training job", [sys.executable, "-m", "launch", f"train.max_steps={a.launch_steps}",
                                     f"run.dir={run_dir}", "logging.wandb=disabled"], a.launch_timeout)
    for name, command, timeout in benchmark_parts(a):
        ok, out = run_part(name, command, timeout)
        result = last_json(out) if ok else None
        if ok and result is None:
            print(f"== {name}: FAILED, printed no JSON object (expected --json output)", flush=True)
            ok = False
        results[name] = ok
        if result is not None:
            print(f"== {name}, summary (MFU by the PaLM formula against the GPU's dense bf16 peak):")
            print("\n".join(summarize(result)) or "   (no MFU or ratio keys in the JSON)")
            if "profile" in result:
                sys.path.insert(0, str(ROOT / "tools"))
                from benchmark import profile_lines

                print("\n".join(profile_lines(result["profile"])), flush=True)

    print("== gpu_check: " + ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in results.items()), flush=True)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
