"""The configuration schema: one dataclass per Hydra group, validated before any worker starts.

The dataclasses are the schema (registered in Hydra's ConfigStore, so an unknown key or a value of
the wrong type is rejected by Hydra itself); the YAML files under conf/ are only presets.
`compose()` is the single entry used by the launcher, by `pretrain.train` under torchrun and by
the tests, so every path sees the same configuration.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A configuration mistake, reported as one line naming the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Preset name, for logs and checkpoint manifests."""
    vocab_size: int = 8192
    """Embedding rows; must be >= the tokenizer's vocabulary and divisible by parallel.tp."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    """Grouped-query attention: key/value heads shared by num_heads/num_kv_heads query heads. None = num_heads."""
    kv_channels: Optional[int] = None
    """Size of each attention head (megatron's name). None = hidden_size / num_heads; Qwen3-0.6B has 128
    with hidden_size 1024 and 16 heads."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU inner size. None = 8/3 * hidden_size rounded up to a multiple of 64."""
    max_seq_len: int = 4096
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float = 10000.0
    rope_scaling: Optional[str] = None
    """None (plain RoPE) | llama3: Llama 3.1+ frequency scaling for long context, shaped by the rope_* keys below."""
    rope_factor: float = 8.0
    """llama3: long wavelengths are divided by this."""
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    """llama3: the context length the unscaled model was trained with."""
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    init_std: float = 0.02
    qkv_bias: bool = False
    """Biases on the q, k and v projections (Qwen2.5); o_proj and the MLP stay bias-free."""
    qk_norm: Optional[str] = None
    """null | head | full: RMSNorm of queries and keys before RoPE. head: over each head's vector, one gain
    shared by all heads (Qwen3); full: over the whole q (and k) projection, one gain per channel (OLMo 2;
    under tensor parallelism its statistics are summed across the TP ranks)."""
    norm_placement: str = "pre"
    """pre: x + f(norm(x)) (Llama, Qwen) | post: x + norm(f(x)), each sublayer's output normalised (OLMo 2)."""
    attention: str = "auto"
    """auto | flash | flex | sdpa. auto = flash-attn for bf16 on CUDA when the package imports; else on
    CUDA flex (FlexAttention for batches with document boundaries, SDPA's flash/cuDNN kernel for whole
    documents); on CPU sdpa. flex trains only on CUDA (pretrain/model/attention.py)."""
    compile: Optional[bool] = None
    """torch.compile each transformer block, and the loss on one TP rank. None = on wherever inductor
    can build kernels (CUDA; the CPU when a C++ compiler is installed), except under ZeRO-3, whose hooks
    gather parameters inside each block (pretrain/compiling.py)."""
    fused_qkv: bool = True
    """One matmul for q, k and v (qkv_proj) instead of three; checkpoints are the same either way."""
    fused_mlp: bool = True
    """One matmul for SwiGLU's gate and up projections (gate_up_proj); checkpoints are the same either way."""
    activation_checkpointing: str = "none"
    """none | full (recompute each block) | selective (recompute attention core and activations)."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return -(-int(8 * self.hidden_size / 3) // 64) * 64


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size; the data-parallel size is world_size / tp."""
    sequence_parallel: bool = False
    """Shard norms and activations along the sequence inside each tensor-parallel group."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3, sharding over the data-parallel group only."""
    overlap_comm: Optional[bool] = None
    """ZeRO 1-3: reduce gradients during the backward on a side stream. null = on with CUDA, off on CPU."""
    reduce_bucket_size: int = 500_000_000
    """ZeRO 1-3: elements per gradient reduce(-scatter) bucket (bigger = fewer, larger messages, more memory);
    capped at the model's parameter count, as DeepSpeed allocates whole buckets."""
    allgather_bucket_size: int = 500_000_000
    """ZeRO 1-2: elements per parameter all-gather bucket after the step; ZeRO-3: prefetch bucket."""
    contiguous_gradients: bool = True
    """ZeRO 1-3: copy gradients into one contiguous buffer as they are produced (less fragmentation)."""


@dataclass
class SourceConfig:
    path: str = "???"
    """A dataset directory or URL (as data.path)."""
    weight: float = 1.0
    """Share of the training tokens drawn from this source (weights are normalised)."""


@dataclass
class DataConfig:
    name: str = "embedded"
    """embedded = the corpus built from this Python installation; otherwise a prepared dataset."""
    path: Optional[str] = None
    """Directory written by tools/prepare_data.py (ignored for the embedded corpus)."""
    cache_dir: str = "~/.cache/pretrain"
    """Where the embedded corpus and its tokenizer are built once and reused."""
    embedded_vocab_size: int = 8192
    """Tokenizer size trained for the embedded corpus."""
    verify_checksums: bool = True
    """Hash every local shard against the manifest's sha256 the first time it is read: bytes changed on disk
    stop the run naming the shard, instead of training on them (a cost of about one extra read per shard)."""
    train_shards: Any = None
    """Instead of data.path: the training shards as WebDataset brace patterns, one or a list (local paths,
    pipe: commands, http(s) URLs), e.g. '/data/train-{000000..000099}.tar'. Each shard is read once at the
    first start to count its documents; the counts are kept in run.dir/data-index (delete it after changing
    a shard in place). No checksums are recorded, so data.verify_checksums does not apply."""
    val_shards: Any = None
    """With data.train_shards: the held-out shards (patterns, as train_shards); needed when evaluating."""
    tokenizer: Optional[str] = None
    """With data.train_shards: the tokenizer.json file (or URL) the shards were tokenized with."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A training mixture, e.g. [{path: a, weight: 0.7}, {path: b, weight: 0.3}]; when set it replaces
    data.path for training (evaluation reads the first source's val split)."""
    shuffle_shards: int = 8
    """Each reader mixes the documents of this many shards in a seeded random order (it holds them
    in memory: 8 shards of 2^24 uint16 tokens are 256 MB); 0 reads every shard in file order."""
    num_workers: int = 0
    """0: batches are prepared in the training process; N >= 1: in a background process per rank that
    reads N shards at a time (downloads and decoding overlap training)."""
    prefetch: int = 4
    """Batches the background process prepares ahead (with num_workers >= 1); pinned on CUDA."""
    timeout: float = 300.0
    """Seconds a shard read may go without receiving a byte before it fails (instead of hanging)."""
    retries: int = 3
    """Further attempts, with exponential backoff from 1 s, when a pipe:/http(s) shard cannot be read."""
    on_bad_shard: str = "error"
    """error: a missing, corrupt or unreachable shard stops the run, naming it | skip: warn, count
    it in metrics.jsonl (skipped_shards) and go on without it."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """Every decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    schedule: str = "cosine"
    """cosine | linear | constant | wsd (after warmup). wsd = warmup-stable-decay: the peak lr until the
    decay, which then runs to the last step."""
    decay_fraction: float = 0.2
    """wsd: the decay takes this fraction of train.max_steps, at the end."""
    decay_shape: str = "1-sqrt"
    """wsd: linear | cosine | 1-sqrt (lr = min + (peak - min) * (1 - sqrt(progress)))."""
    decay_start_step: Optional[int] = None
    """wsd: start the decay at this step instead (annealing a stable run from its checkpoint at this step);
    overrides decay_fraction."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""


@dataclass
class GuardConfig:
    """Loss and gradient guard (pretrain/guard.py): skip bad optimizer steps, roll back after a streak."""

    enabled: bool = True
    spike_sigma: float = 6.0
    """A loss above mean + spike_sigma * std of the last `window` good losses is a spike; 0 disables."""
    window: int = 50
    """Good losses kept for the spike statistics."""
    min_history: int = 10
    """Spikes are judged only once this many good losses are known (early losses fall fast)."""
    max_bad_steps: int = 3
    """This many skipped steps in a row roll the run back to its newest verified checkpoint."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one run before it stops with an error (the run keeps diverging)."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    seq_len: int = 128
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = 1
    global_batch_tokens: Optional[int] = None
    """If set, grad_accum_steps is derived: global_batch_tokens / (micro_batch_size * seq_len * dp)."""
    seed: int = 1234
    precision: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16. fp32 on CUDA uses TF32 matmuls.
    bf16 under ZeRO: bf16 weights with fp32 master partitions; at ZeRO-0 (and so on one data-parallel
    rank): fp32 weights with the forward under autocast (pretrain.precision)."""
    grad_reduce_dtype: str = "fp32"
    """fp32 | bf16: with bf16, the dtype gradients are accumulated over micro-batches (ZeRO 1-3; at
    ZeRO-0 they are fp32 gradients of fp32 weights) and all-reduced / reduce-scattered over
    data-parallel ranks in."""
    device: str = "auto"
    """auto | cpu | cuda."""
    eval_interval: int = 50
    """Evaluate on held-out data every N steps (and at the end); 0 disables."""
    eval_batches: int = 4
    log_interval: int = 10
    """Console progress, wandb and TensorBoard every N steps. Losses, gradient norms and the guard's
    verdicts stay on the device in between and are read in one transfer per interval (and before an
    eval, a checkpoint, a stop and the last step); metrics.jsonl still gets every step."""
    sample_tokens: int = 48
    """Greedy tokens printed after the last step, continuing sample_prompt; 0 = no sample."""
    sample_prompt: str = ""
    """Text the end-of-run sample continues (it starts a new document; empty = unconditional)."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    hang_timeout: float = 1800.0
    """Seconds without a finished step (or save / eval) after which every rank writes its Python
    stacks to <run.dir>/hang-rank<R>.txt and exits non-zero (then launcher.max_restarts applies); 0 disables."""
    collective_timeout: float = 600.0
    """Seconds a collective (all-reduce, barrier...) may wait before the process group fails it."""


@dataclass
class EvalConfig:
    downstream_interval: int = 0
    """Run the lm-eval tasks in eval.tasks every N steps (and at the end); 0 disables."""
    tasks: list[str] = field(default_factory=lambda: ["python_next_line"])
    """lm-eval task names, from pretrain/evals/tasks/ or eval.include_path (local task YAML; nothing is downloaded)."""
    include_path: Optional[str] = None
    """A directory of lm-eval task YAML files to search besides the shipped ones."""
    limit: Optional[int] = None
    """Documents per task (None = all)."""
    batch_size: int = 16
    """Sequences per forward pass during evaluation."""


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Save every N steps and at the end; 0 = only at the end."""
    save_final: bool = True
    """Save when the run reaches train.max_steps (a stop signal always saves); false for benchmarks."""
    keep_last: int = 2
    """Keep this many newest checkpoints; 0 keeps all."""
    resume: bool = True
    """Resume automatically from <run.dir>/checkpoints/latest when present."""
    init_from: Optional[str] = None
    """Start a new run from this checkpoint's weights (for example one imported from Hugging Face)."""
    init_optimizer: bool = False
    """With init_from: also take its Adam moments, step count and data position, so the new run continues
    that run (an annealing fork of a stable run); the data position is kept only when the dataset is the same."""


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs/${run.name}"
    """Everything a run writes: metrics.jsonl, config.yaml, checkpoints/."""


@dataclass
class LoggingConfig:
    wandb: str = "offline"
    """offline | online | disabled. online needs logging.project."""
    project: Optional[str] = None
    tensorboard: bool = False
    """Also write TensorBoard event files to <run.dir>/tensorboard/."""


@dataclass
class ProfileConfig:
    steps: Optional[list[int]] = None
    """[first, last]: write a torch profiler Chrome trace of these optimizer steps (1-based, inclusive) to
    <run.dir>/profile/, one per rank, with a table of the top ops (and a CUDA memory snapshot on GPU)."""


@dataclass
class LauncherConfig:
    kind: str = "local"
    """local (torch elastic launcher on this node) | slurm (srun inside an allocation, else sbatch)."""
    nproc_per_node: Any = "auto"
    """auto = number of GPUs, or 2 on a CPU-only machine."""
    nnodes: int = 1
    """Nodes to run on. Under SLURM the allocation decides (sbatch --nodes); elsewhere > 1 needs rdzv_endpoint."""
    threads_per_process: int = 0
    """CPU threads (OMP_NUM_THREADS) per worker. 0 = OMP_NUM_THREADS if set, else this node's cores divided
    by nproc_per_node. Runs meant to agree bit for bit need the same value: the thread count sets the order
    of floating-point reductions."""
    max_restarts: int = 0
    """Elastic restarts of the whole worker group after a failure; each resumes from latest."""
    rdzv_timeout: int = 300
    """Seconds to wait for all nodes to join the rendezvous (or to reach its host) before failing."""
    rdzv_port: Optional[int] = None
    """Rendezvous port. None = derived from the SLURM job id (so jobs sharing a node differ), else 29500."""
    rdzv_endpoint: Optional[str] = None
    """host[:port] of the rendezvous for a multi-node launch without SLURM; start one launcher per node."""
    local_addr: Optional[str] = None
    """This node's address as the other nodes reach it. Picks the network interface for gloo/NCCL and,
    when it is the rdzv_endpoint host, makes this node the rendezvous host (for hosts whose names do not resolve)."""
    shutdown_timeout: int = 300
    """Seconds the agent gives workers to checkpoint and exit after SIGTERM before it kills them."""
    dry_run: bool = False
    """Print the plan and the commands, start nothing."""
    partition: Optional[str] = None
    time: Optional[str] = None
    """SLURM time limit for submitted jobs (for example 04:00:00)."""


@dataclass
class FaultConfig:
    """Fault injection, for tests only (pretrain/faults.py): damage chosen steps on purpose."""

    nan_steps: list[int] = field(default_factory=list)
    """Steps (1-based, as in metrics.jsonl) whose loss is made NaN on every rank."""
    spike_steps: list[int] = field(default_factory=list)
    """Steps whose loss is multiplied by 1000 (a loss spike with finite values)."""
    nan_grad_steps: list[int] = field(default_factory=list)
    """Steps whose gradients are made NaN after backward (finite loss)."""
    hang_step: int = 0
    """Step during which rank `rank` sleeps for hang_seconds (0 = never)."""
    hang_seconds: float = 3600.0
    kill_step: int = 0
    """Step at which rank `rank` kills itself with SIGKILL, on the first attempt only (0 = never)."""
    rank: int = 0
    """The rank that hangs or is killed."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, node in [("model", ModelConfig), ("parallel", ParallelConfig), ("data", DataConfig),
                        ("optim", OptimConfig), ("launcher", LauncherConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)


_CHOICES = {
    "model.attention": ("auto", "flash", "flex", "sdpa"),
    "model.activation_checkpointing": ("none", "full", "selective"),
    "model.norm_placement": ("pre", "post"),
    "optim.schedule": ("cosine", "linear", "constant", "wsd"),
    "optim.decay_shape": ("linear", "cosine", "1-sqrt"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.grad_reduce_dtype": ("fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "logging.wandb": ("offline", "online", "disabled"),
    "launcher.kind": ("local", "slurm"),
}


@dataclass(frozen=True)
class _Rule:
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None allowed (means "derive it")
    integer: bool = False

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not isinstance(value, int):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    @property
    def text(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo, hi = ("(" if self.low_open else "[") + f"{self.low:g}", f"{self.high:g}" + (")" if self.high_open else "]")
        where = f">= {self.low:g}" if not self.low_open and self.high == math.inf else (
            f"> {self.low:g}" if self.high == math.inf else f"in {lo}, {hi}")
        return f"must be {kind} {where}" + (" (or null)" if self.optional else "")


def _positive(optional: bool = False) -> _Rule:
    return _Rule(0, low_open=True, integer=True, optional=optional)


def _at_least(low: float, integer: bool = True) -> _Rule:
    return _Rule(low, integer=integer)


# Every numeric key and the values it accepts; NaN and inf are always refused.
_NUMERIC: dict[str, _Rule] = {
    "model.vocab_size": _positive(), "model.hidden_size": _positive(), "model.num_layers": _positive(),
    "model.num_heads": _positive(), "model.num_kv_heads": _positive(optional=True),
    "model.kv_channels": _positive(optional=True),
    "model.ffn_hidden_size": _positive(optional=True), "model.max_seq_len": _positive(),
    "model.rope_theta": _Rule(0, low_open=True), "model.norm_eps": _Rule(0, low_open=True),
    "model.init_std": _Rule(0, low_open=True),
    "parallel.tp": _positive(), "parallel.reduce_bucket_size": _positive(),
    "parallel.allgather_bucket_size": _positive(),
    "data.embedded_vocab_size": _at_least(258), "data.shuffle_shards": _at_least(0),
    "data.timeout": _Rule(0, low_open=True, integer=False), "data.retries": _at_least(0),
    "optim.lr": _Rule(0, low_open=True), "optim.min_lr_ratio": _Rule(0, 1), "optim.warmup_steps": _at_least(0),
    "optim.weight_decay": _at_least(0, integer=False), "optim.beta1": _Rule(0, 1, high_open=True),
    "optim.beta2": _Rule(0, 1, high_open=True), "optim.eps": _Rule(0, low_open=True),
    "optim.grad_clip": _at_least(0, integer=False),
    "train.max_steps": _positive(), "train.seq_len": _positive(), "train.micro_batch_size": _positive(),
    "train.grad_accum_steps": _positive(), "train.global_batch_tokens": _positive(optional=True),
    "train.seed": _Rule(0, 2**32 - 1, integer=True), "train.eval_interval": _at_least(0),
    "train.eval_batches": _positive(), "train.log_interval": _positive(), "train.sample_tokens": _at_least(0),
    "train.hang_timeout": _at_least(0, integer=False), "train.collective_timeout": _Rule(0, low_open=True),
    "train.guard.spike_sigma": _at_least(0, integer=False), "train.guard.window": _at_least(2),
    "train.guard.min_history": _at_least(2), "train.guard.max_bad_steps": _positive(),
    "train.guard.max_rollbacks": _at_least(0),
    "checkpoint.interval": _at_least(0), "checkpoint.keep_last": _at_least(0),
    "launcher.nnodes": _positive(), "launcher.max_restarts": _at_least(0), "launcher.rdzv_timeout": _positive(),
    "launcher.rdzv_port": _Rule(1, 65535, integer=True, optional=True), "launcher.shutdown_timeout": _at_least(0),
    "launcher.threads_per_process": _at_least(0),
    "faults.hang_step": _at_least(0), "faults.hang_seconds": _at_least(0, integer=False),
    "faults.kill_step": _at_least(0), "faults.rank": _at_least(0),
}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}: {message}")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Raise ConfigError for the first invalid value. world_size is checked when known."""
    for key, allowed in _CHOICES.items():
        group, name = key.split(".")
        value = getattr(getattr(cfg, group), name)
        _check(value in allowed, key, f"got {value!r}; allowed values: {', '.join(allowed)}")
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    for key, rule in _NUMERIC.items():
        group, _, name = key.rpartition(".")
        node: Any = cfg
        for part in group.split("."):
            node = getattr(node, part)
        value = getattr(node, name)
        if value is None and rule.optional:
            continue
        _check(rule.holds(value), key, f"got {value!r}; {rule.text}")
    _check(m.kv_channels is not None or m.hidden_size % m.num_heads == 0, "model.num_heads",
           f"{m.num_heads} heads do not divide model.hidden_size={m.hidden_size}; choose a divisor or set "
           "model.kv_channels")
    _check(m.kv_heads > 0 and m.num_heads % m.kv_heads == 0, "model.num_kv_heads",
           f"{m.kv_heads} must divide model.num_heads={m.num_heads}")
    _check(m.head_dim % 2 == 0, "model.kv_channels" if m.kv_channels else "model.num_heads",
           f"head size {m.head_dim} must be even for RoPE")
    _check(m.qk_norm in (None, "head", "full"), "model.qk_norm", f"got {m.qk_norm!r}; allowed values: null, head, full")
    _check(t.guard.min_history <= t.guard.window, "train.guard.min_history",
           f"{t.guard.min_history} exceeds train.guard.window={t.guard.window}; lower it or raise the window")
    _check(t.seq_len <= m.max_seq_len, "train.seq_len",
           f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len")
    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"got {p.zero_stage}; allowed values: 0, 1, 2, 3")
    for key, value in [("model.num_heads", m.num_heads), ("model.num_kv_heads", m.kv_heads),
                       ("model.vocab_size", m.vocab_size), ("model.ffn_hidden_size", m.ffn_size)]:
        _check(value % p.tp == 0, key, f"{value} is not divisible by parallel.tp={p.tp}")
    if p.sequence_parallel:
        _check(t.seq_len % p.tp == 0, "train.seq_len",
               f"{t.seq_len} must be divisible by parallel.tp={p.tp} with sequence parallelism")
    _check(0 <= o.decay_fraction <= 1, "optim.decay_fraction", f"must be in [0, 1], got {o.decay_fraction}")
    if o.decay_start_step is not None:
        _check(o.warmup_steps <= o.decay_start_step < t.max_steps, "optim.decay_start_step",
               f"{o.decay_start_step} must be in [optim.warmup_steps={o.warmup_steps}, "
               f"train.max_steps={t.max_steps}); raise train.max_steps to decay after it")
    _check(not cfg.checkpoint.init_optimizer or bool(cfg.checkpoint.init_from), "checkpoint.init_optimizer",
           "needs checkpoint.init_from=<checkpoint> to take the optimizer state from")
    steps = cfg.profile.steps
    if steps is not None:
        _check(len(steps) == 2 and 1 <= steps[0] <= steps[1], "profile.steps",
               f"got {list(steps)}; give [first, last] optimizer steps, 1 <= first <= last (e.g. [5,6])")
    _check(cfg.eval.downstream_interval >= 0, "eval.downstream_interval", "must be >= 0")
    _check(m.rope_scaling in (None, "llama3"), "model.rope_scaling",
           f"got {m.rope_scaling!r}; allowed values: null, llama3")
    if m.rope_scaling == "llama3":
        _check(m.rope_factor >= 1 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor, "model.rope_factor",
               "llama3 scaling needs rope_factor >= 1 and 0 < rope_low_freq_factor < rope_high_freq_factor")
    nproc = cfg.launcher.nproc_per_node
    _check(nproc == "auto" or (isinstance(nproc, int) and nproc > 0), "launcher.nproc_per_node",
           f"got {nproc!r}; use auto or a positive integer")
    _check(all(src.weight > 0 for src in cfg.data.sources), "data.sources", "every weight must be > 0")
    _check(cfg.launcher.threads_per_process >= 0, "launcher.threads_per_process",
           f"got {cfg.launcher.threads_per_process}; use 0 (automatic) or a positive number of threads")
    _check(cfg.data.on_bad_shard in ("error", "skip"), "data.on_bad_shard",
           f"got {cfg.data.on_bad_shard!r}; allowed values: error, skip")
    _check(cfg.data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")
    _check(cfg.data.prefetch >= 1, "data.prefetch", f"must be >= 1, got {cfg.data.prefetch}")
    _check(cfg.data.timeout > 0, "data.timeout", f"must be > 0 seconds, got {cfg.data.timeout}")
    _check(cfg.data.retries >= 0, "data.retries", f"must be >= 0, got {cfg.data.retries}")
    _check(cfg.data.shuffle_shards >= 0, "data.shuffle_shards", f"must be >= 0, got {cfg.data.shuffle_shards}")
    if cfg.data.train_shards or cfg.data.val_shards:
        _check(bool(cfg.data.train_shards), "data.val_shards", "needs data.train_shards too")
        for key, value in (("data.train_shards", cfg.data.train_shards), ("data.val_shards", cfg.data.val_shards)):
            _check(value is None or isinstance(value, str) or (isinstance(value, list) and all(
                isinstance(v, str) for v in value)), key, f"got {value!r}; give a pattern string or a list of them")
        _check(not cfg.data.path and not cfg.data.sources, "data.train_shards",
               "give either shard patterns or data.path / data.sources, not both")
        _check(cfg.data.name != "embedded", "data.train_shards", "shard patterns need data=prepared")
        _check(bool(cfg.data.tokenizer), "data.tokenizer",
               "shard patterns need the tokenizer.json the shards were tokenized with: set data.tokenizer=PATH")
        _check(bool(cfg.data.val_shards) or not cfg.train.eval_interval, "data.val_shards",
               "evaluation needs held-out shards: set data.val_shards=PATTERN, or train.eval_interval=0")
    elif cfg.data.name != "embedded":
        _check(bool(cfg.data.path or cfg.data.sources), "data.path", f"data.name={cfg.data.name} needs data.path "
               "or data.sources (directories written by tools/prepare_data.py), or data.train_shards (patterns)")
    if cfg.logging.wandb == "online":
        _check(bool(cfg.logging.project), "logging.project", "wandb=online needs a project name")
    if world_size is not None:
        _check(world_size % p.tp == 0, "parallel.tp",
               f"world size {world_size} is not a multiple of parallel.tp={p.tp}")
        dp = world_size // p.tp
        if t.global_batch_tokens is not None:
            per_step = t.micro_batch_size * t.seq_len * dp
            _check(t.global_batch_tokens % per_step == 0, "train.global_batch_tokens",
                   f"{t.global_batch_tokens} is not a multiple of micro_batch_size*seq_len*dp={per_step}")


def grad_accum_steps(cfg: Config, dp: int) -> int:
    t = cfg.train
    if t.global_batch_tokens is None:
        return t.grad_accum_steps
    return max(1, t.global_batch_tokens // (t.micro_batch_size * t.seq_len * dp))


def engine_zero_stage(zero_stage: int, dp: int) -> int:
    """The ZeRO stage the engine is built with: parallel.zero_stage, except that ZeRO-1/2 with one
    data-parallel rank run as ZeRO-0. There is nothing to partition over one rank, yet DeepSpeed's
    ZeRO-1/2 optimizers still copy every gradient into flat fp32 buffers and keep a second fp32 copy
    of the weights: in fp32 on CPU that cost 24-31% of the step (tools/benchmark.py, ZeRO-0 against
    ZeRO-1), and in bf16 they read the gradient norm back to the host every step. ZeRO-0 in bf16
    accumulates gradients in fp32 too (pretrain.precision). Checkpoints do not depend on the stage,
    so a run resumes at any stage and any data-parallel size."""
    return 0 if zero_stage in (1, 2) and dp == 1 else zero_stage


def _key_outside(schema: type, values: dict, prefix: str = "") -> str | None:
    """The first key in `values` that `schema` does not have. Hydra rejects a misspelt `key=value`
    itself, but `+key=value` adds the key, and turning the config into the dataclasses drops it
    without a word."""
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in names:
            return f"{prefix}{key}"
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            if found := _key_outside(hints[key], value, f"{prefix}{key}."):
                return found
    return None


_HYDRA_KEY = re.compile(r"Key '([^']+)' (?:is )?not in")


def _one_line(err: BaseException, overrides: list[str]) -> str:
    """Hydra/OmegaConf errors span several lines and chained exceptions; users get one line."""
    chain: list[str] = []
    cause: BaseException | None = err
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__
    text = "\n".join(chain)
    full_key = re.search(r"full_key: (\S+)", text)
    key = full_key.group(1) if full_key else None
    if _HYDRA_KEY.search(text):
        override = re.search(r"Could not override '([^']+)'", text)
        key = override.group(1) if override else key
        return (f"config error: unknown key '{key}'; check the spelling "
                "(`python -m launch --cfg job` prints every key)")
    braced = next((o for o in overrides if "{" in o and "='" not in o and '="' not in o), None)
    if "mismatched input '{'" in text and braced:
        name, _, value = braced.partition("=")
        return (f"config error: {name}: a value with {{braces}} must be quoted inside the override, "
                f"e.g. \"{name}='{value}'\"")
    bad_value = re.search(r"Value '([^']*)' (?:of type '[^']+' )?could not be converted to (\w+)", text)
    if bad_value and key:
        return f"config error: {key}: '{bad_value.group(1)}' is not a valid {bad_value.group(2)}"
    if "Could not find" in text or "Could not load" in text:
        line = next(l for l in text.splitlines() if "Could not" in l).strip()
        options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)+)", text)
        presets = [o.strip() for o in options.group(1).splitlines() if not o.strip().endswith("_schema")] if options else []
        choose = f"; choose one of {', '.join(presets)}" if presets else ""
        return f"config error: {line}{choose} (presets live in {CONF_DIR})"
    first = next((l.strip() for l in text.splitlines() if l.strip()), type(err).__name__)
    where = f"{key}: " if key else ""
    return f"config error: {where}{first} (overrides: {' '.join(overrides)})"


def compose(overrides: list[str] | tuple[str, ...] = (), world_size: Optional[int] = None) -> Config:
    """Compose conf/config.yaml with Hydra overrides, resolve and validate; ConfigError on any problem."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register()
    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=overrides)
        OmegaConf.resolve(raw)
        added = _key_outside(Config, OmegaConf.to_container(raw))
        cfg: Config = OmegaConf.to_object(raw)  # type: ignore[assignment]
    except (HydraException, OmegaConfBaseException) as err:  # user mistakes; anything else is a bug
        raise ConfigError(_one_line(err, overrides)) from err
    finally:
        GlobalHydra.instance().clear()
    if added:
        raise ConfigError(f"config error: unknown key '{added}'; check the spelling (`python -m launch --cfg job` "
                          "prints every key)")
    cfg.run.dir = os.path.expanduser(cfg.run.dir)
    cfg.data.cache_dir = os.path.expanduser(cfg.data.cache_dir)
    validate(cfg, world_size)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> Config:
    """Read a resolved config (as saved in run dirs and checkpoint manifests) back into the schema."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def as_dictconfig(cfg: Config) -> DictConfig:
    return OmegaConf.structured(cfg)
