"""A Llama-style GPT: RoPE, RMSNorm, SwiGLU, grouped-query attention; with the switches that make
it Qwen2.5 (model.qkv_bias), Qwen3 (model.qk_norm=head) or OLMo 2 (model.qk_norm=full,
model.norm_placement=post).

Activations are [seq, batch, hidden] (megatron's layout, so sequence parallelism splits dim 0).
Every linear layer comes from pretrain.parallel.layers: how the model is split over ranks is a
property of those layers, and this file reads the same for every layout. Module names follow
Hugging Face's Llama so checkpoints convert by renaming alone; the fused projections (qkv_proj,
gate_up_proj) are stored in checkpoints as their Hugging Face parts (pretrain.parallel.sharding).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig
from pretrain.model.attention import AttentionKernel, Documents, attention_kernel
from pretrain.model.eager_ops import RMSNorm, rotate
from pretrain.parallel.layers import (ColumnLinear, RowLinear, SequenceGather, ShardedRMSNorm, VocabEmbedding,
                                      mark_partial_grad, megatron_config, sum_replicated_grads_over_tp,
                                      vocab_parallel_loss)


def llama3_scaled(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: wavelengths longer than original_len / low_freq_factor are stretched by
    `factor`, shorter than original_len / high_freq_factor kept, and the band between interpolated."""
    wavelen = 2 * math.pi / inv_freq
    ratio = cfg.rope_original_max_seq_len / wavelen
    smooth = ((ratio - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        if cfg is not None and cfg.rope_scaling == "llama3":
            inv_freq = llama3_scaled(inv_freq, cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> cos, sin [s, b, 1, head_dim / 2] in fp32 (one angle per dimension pair)."""
        angles = (position_ids.t().float()[..., None] * self.inv_freq.to(position_ids.device))[:, :, None, :]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half convention (pairs dimension i with i + d/2), the same as Hugging Face's Llama."""
    return rotate(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mp, sequence_parallel: bool, kernel: AttentionKernel,
                 recompute_core: bool) -> None:
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.head_dim = cfg.head_dim
        self.local_heads, self.local_kv_heads = cfg.num_heads // tp, cfg.kv_heads // tp
        self.gather = SequenceGather(sequence_parallel, mp)
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.fused, bias = cfg.fused_qkv, cfg.qkv_bias
        if self.fused:  # one matmul for q, k and v; checkpoints still hold q_proj, k_proj, v_proj
            self.qkv_proj = ColumnLinear(cfg.hidden_size, 0, mp, sequence_parallel, bias=bias,
                                         parts=(("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)))
        else:
            self.q_proj = ColumnLinear(cfg.hidden_size, q_out, mp, sequence_parallel, bias=bias)
            self.k_proj = ColumnLinear(cfg.hidden_size, kv_out, mp, sequence_parallel, bias=bias)
            self.v_proj = ColumnLinear(cfg.hidden_size, kv_out, mp, sequence_parallel, bias=bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":  # one gain over head_dim, shared by every head (and so by every TP rank)
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            mark_partial_grad(self.q_norm.weight)
            mark_partial_grad(self.k_norm.weight)
        elif cfg.qk_norm == "full":  # over all heads, which TP splits: statistics summed over ranks
            self.q_norm = ShardedRMSNorm(q_out, cfg.norm_eps, mp)
            self.k_norm = ShardedRMSNorm(kv_out, cfg.norm_eps, mp)
        self.o_proj = RowLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, mp, sequence_parallel)
        self.attention = kernel
        self.recompute_core = recompute_core

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, docs: Documents) -> torch.Tensor:
        x = self.gather(x)
        s, b, _ = x.shape
        if self.fused:
            q_local, kv_local = self.local_heads * self.head_dim, self.local_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([q_local, kv_local, kv_local], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(s, b, self.local_heads, self.head_dim)
        k = k.view(s, b, self.local_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = v.view(s, b, self.local_kv_heads, self.head_dim)
        # Under autocast a norm's fp32 gain makes q and k fp32; the kernels take one (16-bit) dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # kernels take [b, s, heads, d]
        if self.recompute_core:  # selective recompute: keep projections, recompute scores/softmax
            out = checkpoint(self.attention, q, k, v, docs, use_reentrant=False)
        else:
            out = self.attention(q, k, v, docs)
        return self.o_proj(out.transpose(0, 1).reshape(s, b, -1))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mp, sequence_parallel: bool, recompute_activation: bool) -> None:
        super().__init__()
        self.gather = SequenceGather(sequence_parallel, mp)
        self.fused = cfg.fused_mlp
        if self.fused:  # one matmul for gate and up; checkpoints still hold gate_proj and up_proj
            self.gate_up_proj = ColumnLinear(cfg.hidden_size, 0, mp, sequence_parallel,
                                             parts=(("gate_proj", cfg.ffn_size), ("up_proj", cfg.ffn_size)))
        else:
            self.gate_proj = ColumnLinear(cfg.hidden_size, cfg.ffn_size, mp, sequence_parallel)
            self.up_proj = ColumnLinear(cfg.hidden_size, cfg.ffn_size, mp, sequence_parallel)
        self.down_proj = RowLinear(cfg.ffn_size, cfg.hidden_size, mp, sequence_parallel)
        self.recompute_activation = recompute_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gather(x)
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.recompute_activation:
            hidden = checkpoint(swiglu, gate, up, use_reentrant=False)
        else:
            hidden = swiglu(gate, up)
        return self.down_proj(hidden)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mp, sequence_parallel: bool, kernel: AttentionKernel) -> None:
        super().__init__()
        selective = cfg.activation_checkpointing == "selective"
        self.post_norm = cfg.norm_placement == "post"
        if not self.post_norm:
            self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, mp, sequence_parallel, kernel, recompute_core=selective)
        # Pre-norm: the MLP's input norm; post-norm: the attention output's norm (Hugging Face's names).
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg, mp, sequence_parallel, recompute_activation=selective)
        if self.post_norm:
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, docs: Documents) -> torch.Tensor:
        if self.post_norm:  # OLMo 2: the residual stream itself is never normalised inside a block
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, docs))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, docs)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, sequence_parallel: bool = False, attention: str | AttentionKernel = "sdpa",
                 on_cuda: bool = False, compile_blocks: bool = False, autocast: torch.dtype | None = None) -> None:
        """attention: a resolved backend name (pretrain.model.attention.resolve_backend) or a kernel;
        compile_blocks: torch.compile each block (the model itself stays an nn.Module) and, on one TP
        rank, the loss (pretrain.parallel.layers.compiled_whole_vocab_loss); autocast:
        run the forward under torch.autocast to this dtype (fp32 weights, 16-bit matmuls and
        attention; pretrain.precision.autocast_dtype), for every caller: training, eval, generation."""
        super().__init__()
        self.cfg = cfg
        self.autocast = autocast
        mp = megatron_config(on_cuda)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, mp, sequence_parallel)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg)
        self.kernel = attention_kernel(attention) if isinstance(attention, str) else attention
        self.layers = nn.ModuleList(Block(cfg, mp, sequence_parallel, self.kernel) for _ in range(cfg.num_layers))
        if compile_blocks:
            for block in self.layers:
                block.compile()  # compiles forward in place; parameter names do not change
        self.compile_loss = compile_blocks
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.gather = SequenceGather(sequence_parallel, mp)
        self.lm_head = ColumnLinear(cfg.hidden_size, cfg.vocab_size, mp, sequence_parallel,
                                    skip_weight=cfg.tie_embeddings)
        self.recompute_blocks = cfg.activation_checkpointing == "full"
        if mp.tensor_model_parallel_size > 1 and (sequence_parallel or cfg.qk_norm == "head"):
            sum_replicated_grads_over_tp(self, sequence_parallel)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, s] -> mean loss against labels, or vocab-sharded logits [b, s, v/tp]."""
        if self.autocast is None:  # no context at all: a caller's own autocast stays in force
            return self._forward(input_ids, labels, position_ids)
        with torch.autocast(input_ids.device.type, dtype=self.autocast):
            return self._forward(input_ids, labels, position_ids)

    def _forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> torch.Tensor:
        device = input_ids.device
        # Document boundaries once per batch, for every layer (from the host copy if it is one).
        docs = self.kernel.documents(position_ids, device)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
        cos, sin = self.rotary(position_ids.to(device, non_blocking=True))
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.recompute_blocks:
                x = checkpoint(layer, x, cos, sin, docs, use_reentrant=False)
            else:
                x = layer(x, cos, sin, docs)
        x = self.gather(self.norm(x))
        weight = self.embed_tokens.weight if self.cfg.tie_embeddings else None
        logits = self.lm_head(x, weight=weight)  # [s, b, v/tp]
        if labels is None:
            return logits.transpose(0, 1)
        return vocab_parallel_loss(logits, labels.t(), compiled=self.compile_loss)
