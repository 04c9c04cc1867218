"""What a launch will do, computed before anything starts: layout, size, tokens, memory per rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.compiling import resolve_compile
from pretrain.config import Config, ConfigError, ModelConfig, engine_zero_stage, grad_accum_steps
from pretrain.precision import bf16_weights


def parameter_count(m: ModelConfig) -> int:
    q_out, kv_out = m.num_heads * m.head_dim, m.kv_heads * m.head_dim
    attention = m.hidden_size * (2 * q_out + 2 * kv_out)
    if m.qkv_bias:  # Qwen2.5: biases on q, k and v
        attention += q_out + 2 * kv_out
    if m.qk_norm == "head":  # one gain over head_dim each for q and k (Qwen3)
        attention += 2 * m.head_dim
    elif m.qk_norm == "full":  # gains over all of q and k (OLMo 2)
        attention += q_out + kv_out
    mlp = 3 * m.hidden_size * m.ffn_size
    per_layer = attention + mlp + 2 * m.hidden_size  # two norms per block, pre- or post-norm alike
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    return embeddings + m.num_layers * per_layer + m.hidden_size


def nproc_per_node(cfg: Config) -> int:
    """Processes per node; more than this node's GPUs is a config error, not a CUDA traceback later."""
    n = cfg.launcher.nproc_per_node
    gpus = torch.cuda.device_count()
    if cfg.train.device == "cuda" and not gpus:
        raise ConfigError("config error: train.device: cuda, but no CUDA device is visible here; "
                          "use train.device=cpu or auto")
    if n == "auto":
        return (gpus if cfg.train.device != "cpu" else 0) or 2
    if cfg.train.device != "cpu" and gpus and int(n) > gpus:
        raise ConfigError(f"config error: launcher.nproc_per_node: {n} processes but this node has {gpus} GPU(s); "
                          f"use launcher.nproc_per_node={gpus} (or auto)")
    return int(n)


@dataclass
class Plan:
    nnodes: int
    nproc_per_node: int
    tp: int
    dp: int
    zero_stage: int
    parameters: int
    tokens_per_step: int
    grad_accum: int
    memory_gib: dict[str, float]

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def describe(self) -> str:
        mem = ", ".join(f"{k} {v:.2f}" for k, v in self.memory_gib.items())
        return (f"plan: {self.nnodes} node(s) x {self.nproc_per_node} process(es) = {self.world_size} ranks "
                f"= tp {self.tp} x dp {self.dp} | ZeRO-{self.zero_stage} | {self.parameters / 1e6:.1f}M parameters | "
                f"{self.tokens_per_step:,} tokens/step (grad accum {self.grad_accum}) | "
                f"est. memory per rank GiB: {mem}")


def estimate_memory_gib(cfg: Config, params: int, dp: int, bf16: bool) -> dict[str, float]:
    """Bytes per rank: weights, gradients and Adam state (ZeRO shards them over dp), ZeRO's
    communication buckets, activations and the logits of the loss.

    bf16 comes in two modes (pretrain.precision). Under ZeRO, per parameter: bf16 weights (2 B), bf16
    gradients (2 B) plus an fp32 gradient (4 B: the accumulation dtype; ZeRO-1/2 add the fp32
    partition the optimizer steps on), an fp32 master copy and two fp32 Adam moments (12 B). At
    ZeRO-0, autocast: fp32 weights, gradients and moments as in fp32, plus autocast's bf16 copy of
    each weight (2 B), held from the weight's use in the forward to its backward (counted under
    "casts"). fp32 keeps 4 B weights, 8 B of moments, and under ZeRO an fp32 master partition too
    (4 B / dp) and two gradient partitions (8 B / dp).
    ZeRO-2/3 hold a gradient bucket of parallel.reduce_bucket_size elements (two with overlap_comm),
    at most the rank's parameter count. tests/test_memory_plan.py checks the fp32 terms and bf16
    ZeRO-0 against tensor bytes on CPU; tests/test_gpu.py the bf16 totals against CUDA's peak.
    Activations follow the Megatron estimate of ~34*s*b*h bytes per layer with flash attention
    (no s^2 score matrix): TP divides 24 of them, sequence parallelism the other 10 too; under
    autocast the two norms of a layer keep their fp32 inputs (the residual stream stays fp32), 4*s*b*h
    bytes more, divided like those 10. tests/test_memory_plan.py checks activations, logits and casts
    against the bytes autograd saves on CPU. Selective recompute drops the SwiGLU product and attention's
    output (ffn + hidden values a token, divided by tp). Full
    recompute keeps one layer's worth plus each layer's input. The loss holds the micro-batch's
    logits (vocab/tp per token) in the compute dtype plus an fp32 copy for the softmax; compiled
    (model.compile on one TP rank) it keeps no fp32 copy, and writes their gradient in the compute
    dtype while they are still held.
    """
    tp, z = cfg.parallel.tp, engine_zero_stage(cfg.parallel.zero_stage, dp)
    p = params / tp
    weights16 = bf16_weights("bf16" if bf16 else "fp32", z)
    autocast = bf16 and not weights16
    weights = p * (2 if weights16 else 4) / (dp if z >= 3 else 1)
    casts = p * 2 if autocast else 0.0
    if weights16:
        grads = p * 2 / (dp if z >= 2 else 1) + p * 4 / (dp if z >= 2 else 1) + (p * 4 / dp if z in (1, 2) else 0)
    elif z == 0:
        grads = p * 4
    else:  # fp32 ZeRO: the reduced gradient partition and the copy the optimizer steps on (measured on CPU)
        grads = 2 * p * 4 / dp
    # fp32 master copy (bf16 weights, and every ZeRO stage, which clones its partition even of fp32 weights) + two moments
    optim = p * (12 if weights16 or z >= 1 else 8) / (dp if z >= 1 else 1)
    buckets = 0.0
    if z >= 2:
        from pretrain.parallel.engine import overlap_comm  # megatron-core loads only for ZeRO-2/3 plans

        # capped at the rank's parameters, as pretrain.parallel.engine caps the bucket it asks for
        buckets = min(cfg.parallel.reduce_bucket_size, p) * (2 if weights16 else 4) * (2 if overlap_comm(cfg) else 1)
    t, m = cfg.train, cfg.model
    sbh, unit = t.seq_len * t.micro_batch_size * m.hidden_size, (2 if bf16 else 4) / 2
    # Megatron's split of the 34: 24 sbh inside attention and the MLP, which TP splits; 10 sbh at the
    # layer's edges (norm and projection inputs), whole on every TP rank unless sequence parallelism splits them.
    edges, inner = (10 * unit + (4 if autocast else 0)) * sbh, 24 * unit * sbh / tp
    per_layer = (edges / tp if cfg.parallel.sequence_parallel else edges) + inner
    compute = 2 if bf16 else 4
    if m.activation_checkpointing == "selective":  # the SwiGLU product and attention's output are recomputed
        per_layer -= t.seq_len * t.micro_batch_size * (m.ffn_size + m.hidden_size) * compute / tp
    if m.activation_checkpointing == "full":
        activations = per_layer + m.num_layers * sbh * 4
    else:
        activations = per_layer * m.num_layers
    # train.device as pretrain.parallel.groups.resolve_device reads it, without its error for a CUDA run
    # planned on a host that has no GPU (and without loading megatron-core, which that module imports)
    on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    # (in fp32 the compiled loss holds what eager does; asking saves the C++ compiler search on the CPU)
    compiled_loss = bf16 and tp == 1 and resolve_compile(m.compile, torch.device("cuda" if on_cuda else "cpu"),
                                                          cfg.parallel.zero_stage)
    logits = t.seq_len * t.micro_batch_size * m.vocab_size / tp * (compute + (compute if compiled_loss else 4))
    gib = 1024**3
    parts = {"weights": weights, "grads": grads, "optimizer": optim, "buckets": buckets, "casts": casts,
             "activations": activations, "logits": logits}
    return {**{k: v / gib for k, v in parts.items()}, "total": sum(parts.values()) / gib}


def make_plan(cfg: Config, nnodes: int | None = None) -> Plan:
    nnodes = nnodes or cfg.launcher.nnodes
    nproc = nproc_per_node(cfg)
    world = nnodes * nproc
    dp = max(1, world // cfg.parallel.tp)
    accum = grad_accum_steps(cfg, dp)
    params = parameter_count(cfg.model)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())
    return Plan(nnodes=nnodes, nproc_per_node=nproc, tp=cfg.parallel.tp, dp=dp,
                zero_stage=engine_zero_stage(cfg.parallel.zero_stage, dp),
                parameters=params, tokens_per_step=cfg.train.micro_batch_size * cfg.train.seq_len * accum * dp,
                grad_accum=accum, memory_gib=estimate_memory_gib(cfg, params, dp, bf16))
