"""The training loop, and nothing else: `torchrun --nproc_per_node=N -m pretrain.train <overrides>`.

The loop does not know the ZeRO stage or the TP size: the engine, the model's layers and the
checkpoint module do. A SIGTERM/SIGUSR1 (sent before a SLURM time limit or by a preemption) is
agreed by all ranks one step later (StopSignal), then a checkpoint is written and the process exits
0; the next start resumes from it.

The host never waits for the device inside a step: losses, gradient norms and the guard's verdicts
stay on the device and are read in one transfer every train.log_interval steps and before an eval,
a checkpoint, a stop or the last step (pretrain/step_metrics.py). Console progress, wandb and
TensorBoard are written at those reads; metrics.jsonl still gets one record per step.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist

import pretrain.parallel  # noqa: F401  (first: sets DeepSpeed's accelerator, quiets megatron-core's import warnings)
from megatron.core import parallel_state
from pretrain import checkpoint, fatal, lifetime
from pretrain.compiling import resolve_compile
from pretrain.config import Config, ConfigError, compose, engine_zero_stage, grad_accum_steps, to_dict, to_yaml
from pretrain.console import Progress, above_progress_bar, describe_run
from pretrain.data import Batch, DatasetError, StateError, TokenLoader, load_tokenizer, prepare_embedded_corpus
from pretrain.data.checks import check_run_data
from pretrain.data.manifest import is_url
from pretrain.data.shards import ReadOptions
from pretrain.data.workers import make_loader
from pretrain.faults import FaultHook, NoFaults
from pretrain.faults import from_config as faults_from_config
from pretrain.guard import DivergedError, StepGuard
from pretrain.evaluation import EVAL_READING, EvalResult, EvalSums, token_byte_lengths
from pretrain.generate import generate, parallel_logits
from pretrain.metrics import MetricsWriter, TensorBoardLogger, WandbLogger, eval_line, flops_per_token, peak_flops
from pretrain.model import GPT, count_parameters, init_weights
from pretrain.model.attention import resolve_backend
from pretrain.parallel import zero3
from pretrain.parallel.engine import (base_optimizer, build_engine, clip_grads, deepspeed_config,
                                      deepspeed_reports_grad_norm, grad_norm_tensor, set_lr)
from pretrain.parallel.groups import ParallelDims, destroy, init_distributed, resolve_device
from pretrain.profiling import StepProfiler
from pretrain.evals.downstream import DownstreamEval
from pretrain.resume import agree_on_checkpoint, agree_on_saved_checkpoints, another_runs_history, trim_metrics
from pretrain.precision import autocast_dtype, configure_matmul_precision, describe_precision, resolve_precision
from pretrain.schedule import learning_rate
from pretrain.step_metrics import StepMetrics
from pretrain.watchdog import HangWatchdog


def log(dims: ParallelDims, message: str) -> None:
    if dims.is_main:
        with above_progress_bar():
            print(message, flush=True)


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 so the loop can stop at a step boundary with a checkpoint.

    The ranks agree on the flag every step without waiting for the device: the flag is a CPU tensor
    all-reduced over a gloo group (host_group), started asynchronously and read one call later, by
    which time a whole step has passed and it has arrived. So a stop is agreed one step after the
    signal. (Checking only at metric reads would cost nothing either, but would delay a stop by up to
    train.log_interval steps, which a time limit's warning may not cover at large intervals.)
    """

    def __init__(self, group: Any = None) -> None:
        self.received: int | None = None
        self._group = group
        self._pending: tuple[Any, torch.Tensor] | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank, at the same step, once any rank got the signal (all must save together).
        Collective: every rank calls it once per step."""
        flag = torch.tensor([1.0 if self.received else 0.0])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        previous, self._pending = self._pending, (work, flag)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1].item())  # a CPU tensor: no device sync

    def close(self) -> None:
        """Finish the outstanding all-reduce (every rank calls this at the same point)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def host_group() -> Any:
    """A process group for CPU tensors (gloo): the default group when it is gloo, else a new one.
    Collective: every rank calls it at the same point."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def dataset_dir(cfg: Config, dims: ParallelDims) -> Path | str:
    if cfg.data.name == "embedded":
        from pretrain.data.embedded import embedded_corpus_name

        built = Path(cfg.data.cache_dir, embedded_corpus_name(cfg.data.embedded_vocab_size), "manifest.json")
        if not built.is_file():
            log(dims, f"building the embedded corpus (first use only, 10-60 s): the Python standard library's "
                      f"sources and docs, a {cfg.data.embedded_vocab_size}-token BPE tokenizer trained on them, "
                      f"token shards in {built.parent}")
        return prepare_embedded_corpus(cfg.data.cache_dir, vocab_size=cfg.data.embedded_vocab_size)
    if cfg.data.train_shards:  # shard patterns: an index in the run directory stands for the manifest
        from pretrain.data.patterns import run_pattern_dataset

        return run_pattern_dataset(cfg.data, cfg.run.dir, dims.dp)
    path = cfg.data.path or cfg.data.sources[0].path
    return path if is_url(path) else Path(path)


def train_sources(cfg: Config, data_dir: Path | str) -> Any:
    """The training data: the dataset, or the weighted mixture data.sources names."""
    if not cfg.data.sources:
        return data_dir
    return [(s.path if is_url(s.path) else Path(s.path), s.weight) for s in cfg.data.sources]


def data_options(cfg: Config) -> dict[str, Any]:
    """The TokenLoader arguments that come from the data config group."""
    return dict(shuffle_shards=cfg.data.shuffle_shards, on_bad_shard=cfg.data.on_bad_shard,
                read_options=ReadOptions(timeout=cfg.data.timeout, retries=cfg.data.retries))


def mean_over_dp(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value.item() / parallel_state.get_data_parallel_world_size()


@torch.no_grad()
def evaluate(engine, data_dir: Path, cfg: Config, dims: ParallelDims, byte_lengths: torch.Tensor) -> EvalResult:
    """Loss (nats/token) and bits per byte on the first eval_batches batches of every DP rank's val shards."""
    loader = TokenLoader(data_dir, "val", cfg.train.seq_len, cfg.train.micro_batch_size, dims.dp_rank, dims.dp,
                         seed=cfg.train.seed, **{**data_options(cfg), **EVAL_READING})
    engine.eval()
    sums = EvalSums(byte_lengths, dims.device)
    batches = iter(loader)
    for _ in range(cfg.train.eval_batches):
        batch = next(batches)
        labels = batch.labels.to(dims.device)
        sums.add(engine(batch.input_ids.to(dims.device), labels, batch.position_ids.to(dims.device)).float(), labels)
    engine.train()
    dist.all_reduce(sums.totals, group=parallel_state.get_data_parallel_group())
    return sums.result()


class BatchSource(Protocol):
    """Where training batches come from: TokenLoader, or any resumable source of Batch objects
    (tools/benchmark.py passes random tokens). One per DP rank."""

    skipped_shards: int
    """Shards skipped as unreadable so far (reported in the metrics)."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]: ...


@dataclass
class Sinks:
    """Where metrics go on rank 0: metrics.jsonl, wandb, TensorBoard and the console progress."""

    writer: MetricsWriter
    wandb: WandbLogger
    tensorboard: TensorBoardLogger
    progress: Progress

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.writer.write(values if "step" in values else {"step": step, **values})
        self.wandb.log(values, step)
        self.tensorboard.log(values, step)

    def close(self) -> None:
        self.progress.close()
        self.writer.close()
        self.wandb.close()
        self.tensorboard.close()


@dataclass
class Trainer:
    cfg: Config
    dims: ParallelDims
    engine: Any
    data_dir: Path
    loader: BatchSource
    precision: str
    guard: StepGuard
    faults: FaultHook = field(default_factory=NoFaults)
    step: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: tuple[int, int] = (0, 0)
    """(step, consumed tokens) of the checkpoint this run continues: the tokens per step may differ
    from this run's (another DP size or batch), so tokens are counted on from there."""
    damaged_checkpoints: set[str] = field(default_factory=set)
    """Checkpoints a resume passed over because they do not verify: keep_last does not count them."""

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.seq_len * self.engine.gradient_accumulation_steps() * self.dims.dp

    @property
    def consumed_tokens(self) -> int:
        step, tokens = self.resumed_at
        return tokens + (self.step - step) * self.tokens_per_step

    def continue_from(self, manifest: dict[str, Any]) -> None:
        """Take the step count (and so the lr schedule) and consumed tokens of a checkpoint's manifest."""
        self.step = manifest["step"]
        self.resumed_at = (self.step, manifest.get("consumed_tokens", self.step * self.tokens_per_step))

    def save(self) -> Path:
        states: list[Any] = [None] * self.dims.world_size
        dist.all_gather_object(states, self.loader.state_dict())
        dp_states = [states[r] for r in range(self.dims.world_size)
                     if r % self.dims.tp == 0]  # TP ranks of one DP rank read the same data
        meta = {
            "optimizer_step": checkpoint.optimizer_step(self.engine), "guard": self.guard.state_dict(),
            "consumed_tokens": self.consumed_tokens,
            "model": to_dict(self.cfg)["model"], "config": to_dict(self.cfg),
            "data": self.loader.merge_states(dp_states), "tokenizer": {"dataset_dir": str(self.data_dir)},
            "layout": {"tp": self.dims.tp, "dp": self.dims.dp, "zero_stage": self.engine.zero_optimization_stage(),
                       "precision": self.precision},
        }
        start = time.perf_counter()
        path = checkpoint.save(self.engine, Path(self.cfg.run.dir) / "checkpoints", self.step, meta,
                               self.cfg.checkpoint.keep_last, self.damaged_checkpoints)
        self.damaged_checkpoints.discard(path.name)  # saved anew over the damaged one
        if self.dims.is_main:
            size = sum(f.stat().st_size for f in path.iterdir())
            log(self.dims, f"checkpoint saved: {path} ({time.perf_counter() - start:.1f}s, {size / 1e6:.1f} MB)")
        return path

    def train_step(self, batches: Iterator) -> tuple[torch.Tensor, Any, float]:
        """One optimizer step over grad_accum micro-batches, with no host read of a device value.

        Returns the guard's verdict row (DP-mean loss, norm, flags, counters; on the device), the
        gradient norm where DeepSpeed reports it after its step (else None: the row has it), and the lr.
        The guard judges the step before the optimizer runs and makes a bad step a no-op on every rank.
        """
        engine, device, step = self.engine, self.dims.device, self.step + 1
        lr = learning_rate(self.step, self.cfg.optim, self.cfg.train.max_steps)
        set_lr(engine, lr)
        reports_norm = deepspeed_reports_grad_norm(engine)
        loss_sum, norm = torch.zeros((), device=device), None
        for micro in range(engine.gradient_accumulation_steps()):
            batch = next(batches)
            # position_ids stay where the loader made them: the model reads document boundaries from
            # a host copy without waiting for the device.
            loss = self.faults.loss(step, engine(batch.input_ids.to(device, non_blocking=True),
                                                 batch.labels.to(device, non_blocking=True),
                                                 batch.position_ids))
            engine.backward(loss)
            loss_sum += loss.detach().float()
            if micro == 0:
                self.faults.inside_step(step)
            if engine.is_gradient_accumulation_boundary():
                self.faults.gradients(step, engine.module)
                norm = None if reports_norm else grad_norm_tensor(engine)
                bad = self.guard.judge(loss_sum, engine.gradient_accumulation_steps(), norm)
                optimizer = base_optimizer(engine)  # fused AdamW: reads found_inf and grad_scale in its step
                self.guard.gate(optimizer, bad)
                if norm is not None:  # this engine does not clip: clip with the norm just computed
                    clip_grads(optimizer, self.cfg.optim.grad_clip, norm)
            engine.step()
        self.step += 1
        return self.guard.verdict, engine.get_global_grad_norm() if reports_norm else None, lr

    def run(self) -> list[dict[str, Any]]:
        cfg, dims = self.cfg, self.dims
        model_flops = flops_per_token(cfg.model, count_parameters(self.engine.module), cfg.train.seq_len)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        peak = peak_flops(dims.device, dtype) * dims.world_size
        derived = {"parameters": count_parameters(self.engine.module), "tokens_per_step": self.tokens_per_step,
                   "world_size": dims.world_size, "dp": dims.dp, "precision": self.precision}
        sinks = Sinks(MetricsWriter(cfg.run.dir, enabled=dims.is_main),
                      WandbLogger(cfg.logging.wandb, cfg.logging.project, cfg.run.dir, cfg.run.name,
                                  {**to_dict(cfg), "derived": derived}, enabled=dims.is_main),
                      TensorBoardLogger(cfg.logging.tensorboard and dims.is_main, cfg.run.dir),
                      Progress(cfg.train.max_steps, self.step, cfg.train.log_interval, enabled=dims.is_main))
        profiler = StepProfiler(cfg.profile.steps, cfg.run.dir, dims.rank, dims.device)
        downstream = DownstreamEval(cfg, self.engine.module, self.data_dir, dims.device)
        stop = StopSignal(host_group())
        metrics = StepMetrics(self.tokens_per_step, model_flops, peak)
        watchdog = HangWatchdog(cfg.train.hang_timeout, cfg.run.dir, dims.rank).start()
        batches: Iterator = iter(self.loader)
        byte_lengths = token_byte_lengths(load_tokenizer(self.data_dir), cfg.model.vocab_size)
        first = self.step + 1
        while self.step < cfg.train.max_steps:
            metrics.step_started()
            profiler.before_step(self.step + 1)
            verdict, norm, lr = self.train_step(batches)
            profiler.after_step(self.step)
            watchdog.beat(f"step {self.step}")
            metrics.add(self.step, verdict, norm, lr, self.consumed_tokens)
            sinks.progress.update(self.step, None)
            last = self.step == cfg.train.max_steps
            stopping = stop.agreed()
            evaluating = bool(cfg.train.eval_interval) and (self.step % cfg.train.eval_interval == 0 or last)
            interval = cfg.checkpoint.interval
            periodic = bool(interval) and self.step % interval == 0
            if not (last or stopping or evaluating or periodic or downstream.due(self.step, last)
                    or self.step == first or self.step % cfg.train.log_interval == 0):
                continue  # nothing needs the device's numbers yet: queue the next step
            if self.flush(metrics, sinks):
                watchdog.beat(f"rollback to step {self.step}")
                continue
            if evaluating:
                result = evaluate(self.engine, self.data_dir, cfg, dims, byte_lengths)
                evaluated = {"eval_loss": result.loss, "eval_bpb": result.bits_per_byte}
                sinks.log(self.step, evaluated)
                log(dims, eval_line(self.step, cfg.train.max_steps, result.loss, result.bits_per_byte))
                watchdog.beat(f"eval at step {self.step}")
            scores = downstream.maybe_run(self.step, last)
            if scores:
                watchdog.beat(f"downstream eval at step {self.step}")
                sinks.log(self.step, scores)
                log(dims, f"step {self.step:>6}/{cfg.train.max_steps} | " +
                    " | ".join(f"{k.removeprefix('downstream/')} {v:.4f}" for k, v in scores.items()))
            periodic = periodic and not self.guard.last.streak  # never save mid-streak
            if (last and cfg.checkpoint.save_final) or stopping or periodic:
                self.save()
                watchdog.beat(f"checkpoint at step {self.step}")
            if stopping:
                log(dims, f"stopped by signal {stop.received or 'on another rank'} at step {self.step}; "
                          "checkpoint saved, resume by starting the same run again")
                break
        stop.close()
        sinks.progress.close()
        if cfg.train.sample_tokens and self.step == cfg.train.max_steps and cfg.parallel.sequence_parallel and dims.tp > 1:
            # Sequence parallelism splits the sequence over TP ranks, so a prompt of any length cannot run.
            log(dims, "no end-of-run sample: generation does not run with parallel.sequence_parallel=true; "
                      "sample the checkpoint with tools/generate.py")
        elif cfg.train.sample_tokens and self.step == cfg.train.max_steps:
            log(dims, f"greedy sample after {self.step} steps, prompt {cfg.train.sample_prompt!r}:\n"
                      + cfg.train.sample_prompt + self.sample(cfg.train.sample_prompt, cfg.train.sample_tokens))
        watchdog.stop()
        sinks.close()
        return self.records

    def flush(self, metrics: StepMetrics, sinks: "Sinks") -> bool:
        """Read the steps since the last flush (one device read), log them, and roll back if one of
        them ended a streak of train.guard.max_bad_steps bad steps; True if it rolled back."""
        steps = metrics.flush()
        for record, verdict in steps:
            record["skipped_shards"] = self.loader.skipped_shards  # as of the flush
            self.records.append(record)
            sinks.log(record["step"], record)
            sinks.progress.update(record["step"], record)
            if verdict.skipped:
                log(self.dims, self.guard.describe_skip(record["step"], verdict))
            elif not math.isfinite(verdict.loss):  # only with train.guard.enabled=false
                raise DivergedError(f"loss is {verdict.loss} at step {record['step']}; lower optim.lr or check the data")
        if not steps:
            return False
        self.guard.observe(steps[-1][1])
        verdicts = [v for _, v in steps]
        if not self.guard.needs_rollback(verdicts):
            return False
        sinks.writer.close()
        self.rollback(next(r["step"] for r, v in steps if self.guard.needs_rollback([v])))
        sinks.writer = MetricsWriter(self.cfg.run.dir, enabled=self.dims.is_main)
        return True

    @torch.no_grad()
    def sample(self, prompt: str, max_new_tokens: int) -> str:
        """Greedy continuation of prompt; every rank runs it (TP shards and ZeRO-3 need all of them)."""
        from pretrain.data.tokenizer import eos_id

        tokenizer = load_tokenizer(self.data_dir)
        eos = eos_id(tokenizer)
        self.engine.eval()
        new = generate(parallel_logits(self.engine), [eos] + tokenizer.encode(prompt, add_special_tokens=False).ids,
                       max_new_tokens, self.cfg.model.max_seq_len, stop_id=eos, device=self.dims.device)
        self.engine.train()
        return tokenizer.decode([t for t in new if t != eos])

    def rollback(self, bad_step: int) -> None:
        """Back to the newest verified checkpoint: weights, moments, step and RNG, but not the data
        position, so the batches that produced the bad steps are not read again. bad_step ended the
        streak; the steps run after it until the metrics were read are undone too."""
        root = Path(self.cfg.run.dir) / "checkpoints"
        read_at = self.step
        ckpt, damaged = agree_on_checkpoint(root)
        self.damaged_checkpoints.update(damaged)
        if ckpt is None:
            raise DivergedError(f"{self.cfg.train.guard.max_bad_steps} bad steps in a row at step {bad_step} and no "
                                "checkpoint to roll back to; lower optim.lr or save earlier (checkpoint.interval)")
        manifest = checkpoint.load(self.engine, ckpt, to_dict(self.cfg)["model"], verified=True)
        self.guard.rolled_back(bad_step)
        self.continue_from(manifest)
        self.records = [r for r in self.records if r["step"] <= self.step]
        if self.dims.is_main:
            trim_metrics(self.cfg.run.dir, self.step)
        since = f"; steps {bad_step + 1}-{read_at}, run before the metrics were read, are undone too" \
            if read_at > bad_step else ""
        log(self.dims, f"rolled back from step {bad_step} to {ckpt} (step {self.step}) after "
                       f"{self.cfg.train.guard.max_bad_steps} bad steps in a row{since}; the data position stays "
                       f"past the bad batches (rollback {self.guard.rollbacks} of at most "
                       f"{self.cfg.train.guard.max_rollbacks})")


def build(cfg: Config, faults: FaultHook | None = None, batches: BatchSource | None = None) -> Trainer:
    """faults: a test's fault injection (default: what the faults.* keys say, normally nothing);
    batches: replaces the dataset's TokenLoader (the dataset is still checked, for its vocabulary)."""
    device_kind = resolve_device(cfg.train.device)
    dims = init_distributed(cfg.parallel.tp, device_kind, timeout_minutes=cfg.train.collective_timeout / 60)
    torch.manual_seed(cfg.train.seed)
    precision = resolve_precision(cfg.train.precision, dims.device)
    configure_matmul_precision(precision, dims.device)
    data_dir = dataset_dir(cfg, dims)
    check_run_data(data_dir, [s.path for s in cfg.data.sources], bool(cfg.train.eval_interval), dims.dp,
                   cfg.model.vocab_size)
    backend = resolve_backend(cfg.model.attention, dims.device, precision)
    accum, dtype = grad_accum_steps(cfg, dims.dp), torch.bfloat16 if precision == "bf16" else torch.float32
    compile_blocks = resolve_compile(cfg.model.compile, dims.device, cfg.parallel.zero_stage)
    autocast = autocast_dtype(precision, engine_zero_stage(cfg.parallel.zero_stage, dims.dp))
    with zero3.construction_context(cfg.parallel.zero_stage, deepspeed_config(cfg, accum, precision), dtype,
                                    dims.device):
        model = GPT(cfg.model, sequence_parallel=cfg.parallel.sequence_parallel, attention=backend,
                    on_cuda=dims.device.type == "cuda", compile_blocks=compile_blocks, autocast=autocast)
    if not any(zero3.is_partitioned(p) for p in model.parameters()):  # zero.Init placed its partitions
        model = model.to(dims.device)
    init_weights(model, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers)
    engine = build_engine(model, cfg, accum, precision)
    checkpoint.materialize_optimizer_state(engine)
    loader = batches if batches is not None else make_loader(
        cfg.data.num_workers, cfg.data.prefetch, pin_memory=dims.device.type == "cuda",
        dataset_dir=train_sources(cfg, data_dir), split="train", seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size, dp_rank=dims.dp_rank, dp_size=dims.dp,
        seed=cfg.train.seed, verify_checksums=cfg.data.verify_checksums, **data_options(cfg))
    trainer = Trainer(cfg, dims, engine, data_dir, loader, precision, StepGuard(cfg.train.guard, dims.device),
                      faults or faults_from_config(cfg.faults, dims.rank))
    start = resume(trainer)
    if dims.is_main:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.dir) / "config.yaml").write_text(to_yaml(cfg))
    log(dims, describe_run(cfg, world_size=dims.world_size, tp=dims.tp, dp=dims.dp, device=dims.device.type,
                           zero_stage=engine.zero_optimization_stage(),
                           parameters=count_parameters(model), tokens_per_step=trainer.tokens_per_step,
                           grad_accum=engine.gradient_accumulation_steps(),
                           precision=describe_precision(precision, engine.zero_optimization_stage()),
                           attention=backend, compiled=compile_blocks, data_dir=data_dir, start=start).block())
    return trainer


def resume(trainer: Trainer) -> str:
    """Load the run's latest checkpoint (or checkpoint.init_from's weights); say where training starts."""
    cfg, dims = trainer.cfg, trainer.dims
    model_cfg = to_dict(cfg)["model"]
    root = Path(cfg.run.dir) / "checkpoints"
    if not cfg.checkpoint.resume and (saved := agree_on_saved_checkpoints(root)):
        # A run starting over there would replace same-step ones and prune the rest.
        raise ConfigError(f"config error: checkpoint.resume=false but {root} holds checkpoints "
                          f"({', '.join(saved[-2:])}); starting over would overwrite them: use another run.dir, "
                          "or delete them first")
    latest, damaged = agree_on_checkpoint(root) if cfg.checkpoint.resume else (None, [])
    trainer.damaged_checkpoints.update(damaged)
    start = time.perf_counter()
    if latest is not None:
        manifest = checkpoint.load(trainer.engine, latest, model_cfg, verified=True)
        trainer.continue_from(manifest)
        trainer.loader.load_state_dict(manifest["data"])
        trainer.guard.load_state_dict(manifest.get("guard"))
        saved = manifest["layout"]
        started = (f"resuming from {latest} at step {trainer.step} (saved with tp {saved.get('tp')} x "
                   f"dp {saved.get('dp')}, ZeRO-{saved.get('zero_stage')}; loaded in {time.perf_counter() - start:.1f}s)")
        before = manifest.get("consumed_tokens", 0) // max(1, trainer.step)
        if trainer.step and before != trainer.tokens_per_step:
            log(dims, f"note: a step now takes {trainer.tokens_per_step:,} tokens, {before:,} before this resume "
                      "(another DP size or batch); train.global_batch_tokens keeps the global batch fixed")
    elif cfg.checkpoint.init_from:
        source = checkpoint.resolve(cfg.checkpoint.init_from)
        fork = cfg.checkpoint.init_optimizer
        manifest = checkpoint.load(trainer.engine, source, model_cfg, weights_only=not fork)
        if fork:  # continue that run's step count (and so its lr schedule) and, on the same data, its position
            trainer.continue_from(manifest)
            trainer.guard.load_state_dict(manifest.get("guard"))
            try:
                trainer.loader.load_state_dict(manifest["data"])
            except StateError as err:
                log(dims, f"reading the data from its start: the checkpoint's data position does not fit ({err})")
        started = (f"step {trainer.step}, {'weights and optimizer state' if fork else 'weights'} initialised "
                   f"from {source}")
    else:
        started = f"step 0, fresh weights (seed {cfg.train.seed})"
    # Unless told to start over (checkpoint.resume=false), a fresh start keeps off another run's history.
    if trainer.step == 0 and cfg.checkpoint.resume and (clash := another_runs_history(cfg.run.dir, to_dict(cfg))):
        raise ConfigError(clash)
    if dims.is_main:  # steps after the resumed one (all of them when starting over) are redone
        trim_metrics(cfg.run.dir, trainer.step)
    return started


def main(argv: list[str] | None = None) -> int:
    if (agent := lifetime.agent_pid()) is not None:  # never train on, unsupervised, after the agent is gone
        lifetime.die_with_parent(agent)
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        trainer = build(cfg)
        trainer.run()
    except (ConfigError, checkpoint.CheckpointError, DatasetError, StateError, DivergedError) as err:
        fatal.report(str(err))
        return 2
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
