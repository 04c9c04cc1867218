"""Throughput and model FLOPs utilisation, and the sinks metrics go to (console, jsonl, wandb)."""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.config import ModelConfig

# Dense bf16 peak (no sparsity) in FLOP/s, matched against torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "A6000": 155e12, "L40S": 362e12, "L40": 181e12,
    "L4": 121e12, "A10": 125e12, "V100": 125e12, "4090": 165e12, "3090": 71e12,
}


def flops_per_token(cfg: ModelConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6N for the matmuls with the weights plus
    12 * layers * (heads * head size) * seq for attention scores. N excludes the input embedding (a lookup)."""
    n = num_params - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_embeddings else 1)
    return 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


@functools.cache
def measure_cpu_peak_flops(dtype: torch.dtype = torch.float32, max_size: int = 1024, trials: int = 5,
                           seconds: float = 0.1) -> float:
    """A CPU has no spec-sheet peak worth using: measure the matmul rate this process gets.

    The best of several short trials, so a moment of contention (another rank still starting up)
    does not understate the peak and overstate MFU. The matrix grows from 128 up to max_size only
    while one product stays well inside a trial: bf16 on a CPU without bf16 units takes seconds for
    a 1024 x 1024 product, which would stall the first log line of every run. Measured once per
    process and dtype.
    """
    size = 128
    while size < max_size:
        a = torch.randn(size * 2, size * 2, dtype=dtype)
        start = time.perf_counter()
        a @ a
        if time.perf_counter() - start > seconds / 4:
            break
        size *= 2
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm up
    best = 0.0
    for _ in range(trials):
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value if dtype == torch.bfloat16 else value / 2  # TF32 is half the bf16 rate
        return float("nan")
    # A CPU without bf16 units runs bf16 products through fp32, at a rate that depends on the shape
    # (small ones far slower): the peak is the faster of the two, or bf16 MFU could pass 100%.
    return max(measure_cpu_peak_flops(dtype), measure_cpu_peak_flops(torch.float32))


class MetricsWriter:
    """Writes one JSON object per record to <run.dir>/metrics.jsonl (append: a resumed run continues it)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class WandbLogger:
    """wandb, offline unless the user configures a project and mode online; never blocks training.

    The run id is kept in <run.dir>/wandb_id, so a resumed job continues the same wandb run. The
    resolved configuration is the run's config; wandb samples system stats (CPU, memory, GPU) in
    the background every 15 s (WANDB_X_STATS_SAMPLING_INTERVAL changes it).
    """

    def __init__(self, mode: str, project: str | None, run_dir: str, name: str, config: dict, enabled: bool) -> None:
        self.run = None
        if not enabled or mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project or "pretrain", name=name, dir=run_dir, mode=mode,
                              config=config, resume="allow", id=_wandb_id(run_dir),
                              settings=wandb.Settings(x_disable_stats=False))

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class TensorBoardLogger:
    """TensorBoard event files in <run.dir>/tensorboard/, beside wandb (every numeric value, by step)."""

    def __init__(self, enabled: bool, run_dir: str) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _wandb_id(run_dir: str) -> str:
    """A stable id per run directory, so a resumed job appends to the same wandb run."""
    path = Path(run_dir) / "wandb_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def console_line(rec: dict[str, Any], max_steps: int, eta_s: float) -> str:
    return (f"step {rec['step']:>6}/{max_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"grad_norm {rec['grad_norm']:.3f} | {rec['tokens_per_sec']:,.0f} tok/s | "
            f"MFU {100 * rec['mfu']:.2f}% | ETA {format_eta(eta_s)}")


def eval_line(step: int, max_steps: int, loss: float, bits_per_byte: float) -> str:
    return (f"step {step:>6}/{max_steps} | eval_loss {loss:.4f} | eval {bits_per_byte:.3f} bits/byte | "
            f"perplexity {math.exp(min(loss, 700)):,.1f}")
