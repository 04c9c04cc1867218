"""What a run prints: the start-up block, the progress bar (or plain lines), and nothing else.

Only rank 0 prints. On a terminal progress is a live tqdm bar; when stdout is a file or a pipe
(SLURM logs, CI) it is one plain line every train.log_interval steps, which greps and diffs well.
Libraries' known-harmless start-up chatter is dropped at its source (see `drop_lines`).
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO

from pretrain.metrics import console_line, format_eta

if TYPE_CHECKING:
    from pretrain.config import Config

# Printed (with print(), not a logger) by DeepSpeed's CPU communication backend on every rank.
DEEPSPEED_NOISE = ("deepspeed_shm_comm_op built successfully",)


@contextlib.contextmanager
def drop_lines(patterns: tuple[str, ...], stream: TextIO | None = None) -> Iterator[None]:
    """Run a block with Python-level stdout filtered: lines containing a pattern are dropped,
    every other line is passed on unchanged (so real messages still get through)."""
    target = stream or sys.stdout
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines(keepends=True):
            if not any(p in line for p in patterns):
                target.write(line)
        target.flush()


@dataclass
class StartupInfo:
    """The facts a user checks before leaving a run alone; one line each in the start-up block."""

    run_dir: str
    model: str
    layout: str
    tokens_per_step: str
    data: list[str]
    precision: str
    attention: str
    compiled: bool
    resume: str
    outputs: str

    def lines(self) -> list[str]:
        rows = [("model", self.model), ("layout", self.layout), ("batch", self.tokens_per_step)]
        rows += [("data" if i == 0 else "", line) for i, line in enumerate(self.data)]
        compiled = "compiled blocks (model.compile)" if self.compiled else "eager blocks"
        rows += [("precision", f"{self.precision} | attention {self.attention} | {compiled}"), ("start", self.resume),
                 ("outputs", self.outputs)]
        return [f"  {key:<10} {value}" for key, value in rows]

    def block(self) -> str:
        return "\n".join([f"run {self.run_dir}", *self.lines()])


@contextlib.contextmanager
def above_progress_bar(stream: TextIO | None = None) -> Iterator[None]:
    """Print a line while a live tqdm bar is on screen: the bar is cleared, then redrawn below."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=stream or sys.stdout):
        yield


def data_lines(cfg: Config, data_dir: Any) -> list[str]:
    """One line per data source: where it is and how many tokens each split holds."""
    from pretrain.data import DatasetError, read_manifest

    sources = [(data_dir, 1.0)] if isinstance(data_dir, (str, Path)) else list(data_dir)
    lines = []
    for path, weight in sources:
        try:
            splits = read_manifest(path).splits
            counts = ", ".join(f"{name} {sum(s.tokens for s in shards):,} tokens ({len(shards)} shards)"
                               for name, shards in splits.items())
        except (DatasetError, OSError) as err:  # the loader reports it properly; the block only describes
            counts = f"unreadable manifest ({err})"
        share = f" weight {weight:g}," if len(sources) > 1 else ""
        lines.append(f"{cfg.data.name} {path}:{share} {counts}")
    return lines


def describe_run(cfg: Config, *, world_size: int, tp: int, dp: int, device: str, zero_stage: int, parameters: int,
                 tokens_per_step: int, grad_accum: int, precision: str, attention: str, compiled: bool,
                 data_dir: Any, start: str) -> StartupInfo:
    m, t = cfg.model, cfg.train
    embedding = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    ckpt = cfg.checkpoint
    end = " and at the end" if ckpt.save_final else ""
    every = f"every {ckpt.interval} steps{end}" if ckpt.interval else "at the end"
    keep = f"keep last {ckpt.keep_last}" if ckpt.keep_last else "keep all"
    saved = (f"checkpoints/ ({every}, {keep})" if ckpt.interval or ckpt.save_final
             else "no checkpoints (checkpoint.interval=0, checkpoint.save_final=false)")
    wandb = "" if cfg.logging.wandb == "disabled" else f", wandb/ ({cfg.logging.wandb})"
    return StartupInfo(
        run_dir=cfg.run.dir,
        model=(f"{m.name}: {parameters / 1e6:.1f}M parameters ({embedding / 1e6:.1f}M in embeddings) | "
               f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads ({m.kv_heads} kv), "
               f"ffn {m.ffn_size}, vocab {m.vocab_size}"),
        layout=(f"{world_size} rank(s) on {device} = tp {tp} x dp {dp} | ZeRO-{zero_stage}"
                + (f" (parallel.zero_stage={cfg.parallel.zero_stage}: nothing to shard on one data-parallel rank)"
                   if zero_stage != cfg.parallel.zero_stage else "")
                + ((" | sequence parallel" if tp > 1 else
                    " (parallel.sequence_parallel=true: nothing to split over one TP rank, so it is off)")
                   if cfg.parallel.sequence_parallel else "")
                + (f" | activation checkpointing {m.activation_checkpointing}"
                   if m.activation_checkpointing != "none" else "")),
        tokens_per_step=(f"{tokens_per_step:,} tokens/step = {t.micro_batch_size} seqs x {t.seq_len} tokens x "
                         f"dp {dp} x accum {grad_accum} | {t.max_steps} steps = "
                         f"{t.max_steps * tokens_per_step:,} tokens"),
        data=data_lines(cfg, data_dir), precision=precision, attention=attention, compiled=compiled,
        resume=start,
        outputs=f"metrics.jsonl, config.yaml, {saved}{wandb}")


class Progress:
    """Progress of the steps of one run, on rank 0 (every method is a no-op elsewhere).

    `update(step, None)` is called after every optimizer step, and `update(step, record)` with each
    step's metrics record when the loop reads them (every few steps, in a batch, so possibly after
    later steps have run).
    A terminal gets a tqdm bar whose postfix shows the newest record; anything else gets
    `console_line` at steps that are multiples of log_interval, the first step and the last.
    """

    def __init__(self, max_steps: int, start_step: int, log_interval: int, enabled: bool,
                 stream: TextIO | None = None, live: bool | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.max_steps, self.start_step, self.log_interval = max_steps, start_step, max(1, log_interval)
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = enabled and (self.stream.isatty() if live is None else live)
        self._clock = clock
        self._latest = start_step  # the newest step run (ETA and the bar count from it)
        self._warm: tuple[int, float] | None = None  # (step, time) when the process's first step ended
        self._bar = None
        if self.live:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, file=self.stream, dynamic_ncols=True,
                             unit="step", smoothing=0.1, mininterval=0.5,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                        "[{elapsed}<{remaining}{postfix}]", desc="train")

    def eta(self, step: int) -> float:
        """Seconds left, at the pace of the steps since this process's first: that one also compiles
        the blocks and warms the allocator, and would make the estimate of a long run many times too
        long. Unknown (nan) until a second step has run."""
        if self._warm is None or step <= self._warm[0]:
            return float("nan")
        warm_step, warm_time = self._warm
        return (self._clock() - warm_time) / (step - warm_step) * (self.max_steps - step)

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        if not self.enabled:
            return
        if record is None or step >= self._latest:  # records of earlier steps may arrive later, in a batch
            self._latest = step
            if self._warm is None:
                self._warm = (step, self._clock())
        if self._bar is not None:
            if record is not None and "loss" in record:
                self._bar.set_postfix_str(postfix(record), refresh=False)
            self._bar.update(self._latest - self._bar.n)
            return
        due = step % self.log_interval == 0 or step == self.start_step + 1 or step == self.max_steps
        if record is not None and "loss" in record and due:
            self.write(console_line(record, self.max_steps, self.eta(self._latest)))

    def write(self, message: str) -> None:
        """A line that must not be overwritten by the bar (eval results, checkpoints)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def postfix(rec: dict[str, Any]) -> str:
    """The bar's right-hand side: the numbers worth watching, short enough for 120 columns."""
    return (f"loss {rec['loss']:.3f} | lr {rec['lr']:.1e} | {rec['tokens_per_sec']:,.0f} tok/s | "
            f"MFU {100 * rec['mfu']:.1f}%")


__all__ = ["DEEPSPEED_NOISE", "Progress", "StartupInfo", "above_progress_bar", "describe_run", "drop_lines",
           "format_eta", "postfix"]
