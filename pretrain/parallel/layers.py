"""Tensor-parallel layers: megatron-core's, plus device-agnostic sequence parallelism.

megatron-core's layers implement sequence parallelism with CUDA-only buffers. Here they are built
with megatron's own sequence parallelism off and, when `sequence_parallel` is set, the layer
gathers / reduce-scatters along the sequence with `pretrain.parallel.sequence`, which runs on any
device. The model composes these layers and never branches on the layout.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from pretrain.parallel.sequence import (
    gather_from_sequence_parallel,
    reduce_scatter_to_sequence_parallel,
    scatter_to_sequence_parallel,
)
from pretrain.parallel.sharding import mark_fused


def _no_init(weight: torch.Tensor) -> None:
    """Weights are filled later by pretrain.model.init, identically for every layout."""


def _mark_sharded(weight: torch.Tensor | None, dim: int) -> None:
    """Record how a weight is split (megatron only does this when it initialises the weight itself).

    DeepSpeed reads `tensor_model_parallel` to count each shard once in the global gradient norm;
    pretrain.parallel.sharding reads `partition_dim` to gather and split full tensors.
    """
    if weight is not None and not hasattr(weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(weight, True, dim, 1)


def megatron_config(on_cuda: bool) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        sequence_parallel=False,
        use_cpu_initialization=not on_cuda,
        perform_initialization=False,
        params_dtype=torch.float32,
    )


class SequenceGather(torch.nn.Module):
    """Before column-parallel layers: all-gather sequence shards (identity without SP).

    One gather feeds q, k and v (or gate and up), instead of one per layer.
    """

    def __init__(self, sequence_parallel: bool, config: ModelParallelConfig) -> None:
        super().__init__()
        self.sp = sequence_parallel and config.tensor_model_parallel_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp:  # under autocast, gather the 16-bit copy the layers would cast to anyway: half the bytes
            (x,) = autocast_operands(x)
            return gather_from_sequence_parallel(x, parallel_state.get_tensor_model_parallel_group())
        return x


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the tensors cast to autocast's dtype, as autocast casts F.linear's operands.

    megatron's linear is an autograd Function that multiplies its saved operands again in backward,
    where it restores autocast on CUDA only: on CPU an fp32 weight would meet a bf16 gradient.
    Handing it operands of one dtype works everywhere, and saves the bf16 input for backward
    instead of the fp32 one.
    """
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """Output features split over the TP group; input replicated (gathered by SequenceGather under SP)."""

    def __init__(self, in_features: int, out_features: int, config: ModelParallelConfig,
                 sequence_parallel: bool = False, skip_weight: bool = False,
                 parts: tuple[tuple[str, int], ...] | None = None, bias: bool = False) -> None:
        """parts: the weights this one stacks, ((name, out features), ...); each is split over TP
        ranks on its own, so a rank's output is its slice of each part, in order. bias: a bias,
        split over TP ranks like the output features (megatron marks it and zeroes it)."""
        if parts is not None:
            out_features = sum(rows for _, rows in parts)
        # Under sequence parallelism SequenceGather's backward already reduce-scatters the input
        # gradient, so megatron's all-reduce of it must be off.
        # The bias is added here, not inside megatron's Function, so that it meets the output in
        # the output's dtype (autocast_operands).
        super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=bias,
                         gather_output=False, skip_weight_param_allocation=skip_weight, skip_bias_add=True,
                         disable_grad_reduce=sequence_parallel and config.tensor_model_parallel_size > 1)
        _mark_sharded(self.weight, 0)
        if parts is not None:
            mark_fused(self.weight, parts)
            if self.bias is not None:
                mark_fused(self.bias, parts)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        x, weight = autocast_operands(x, self.weight if weight is None else weight)
        out, bias = super().forward(x, weight=weight)
        return out if bias is None else out + bias.to(out.dtype)


class RowLinear(tensor_parallel.RowParallelLinear):
    """Input features split over the TP group; output summed (or reduce-scattered to sequence shards)."""

    def __init__(self, in_features: int, out_features: int, config: ModelParallelConfig,
                 sequence_parallel: bool = False) -> None:
        super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=False,
                         input_is_parallel=True, skip_bias_add=False)
        _mark_sharded(self.weight, 1)
        self.sp = sequence_parallel and config.tensor_model_parallel_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The local product is F.linear (autocast casts its operands), not megatron's Function:
        a row-parallel layer has no input gradient to all-reduce, so the Function adds nothing."""
        partial = F.linear(x, self.weight)
        group = parallel_state.get_tensor_model_parallel_group()
        if self.sp:
            return reduce_scatter_to_sequence_parallel(partial, group)
        return tensor_parallel.reduce_from_tensor_model_parallel_region(partial, group=group)


class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    """Vocabulary rows split over the TP group; returns [seq, batch, hidden] (sequence-sharded with SP)."""

    def __init__(self, vocab_size: int, hidden_size: int, config: ModelParallelConfig,
                 sequence_parallel: bool = False) -> None:
        super().__init__(vocab_size, hidden_size, init_method=_no_init, config=config)
        _mark_sharded(self.weight, 0)
        self.sp = sequence_parallel and config.tensor_model_parallel_size > 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        hidden = super().forward(input_ids.t()).contiguous()  # [b, s] ids -> [s, b, h]
        if self.sp:
            hidden = scatter_to_sequence_parallel(hidden, parallel_state.get_tensor_model_parallel_group())
        return hidden


class _SumOverTP(torch.autograd.Function):
    """All-reduce (sum) over the TP group whose gradient is the all-reduced gradient: each rank's
    output feeds only its own features, so d loss / d sum is the sum of the ranks' parts."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        torch.distributed.all_reduce(x, group=parallel_state.get_tensor_model_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _SumOverTP.apply(grad)


class ShardedRMSNorm(torch.nn.Module):
    """RMSNorm over features that are split over the TP group (a column-parallel layer's output, such
    as the whole q projection in OLMo 2's QK-norm): each rank holds its slice of the gain, and the
    sum of squares is all-reduced so every rank divides by the RMS of the full vector."""

    def __init__(self, features: int, eps: float, config: ModelParallelConfig) -> None:
        super().__init__()
        self.tp = config.tensor_model_parallel_size
        self.features, self.eps = features, eps
        self.weight = torch.nn.Parameter(torch.ones(features // self.tp))
        _mark_sharded(self.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        square_sum = x32.pow(2).sum(-1, keepdim=True)
        if self.tp > 1:
            square_sum = _SumOverTP.apply(square_sum)
        return (x32 * torch.rsqrt(square_sum / self.features + self.eps)).to(x.dtype) * self.weight


def mark_partial_grad(param: torch.Tensor) -> None:
    """A replicated parameter applied to this rank's heads only (a per-head QK-norm gain): each TP
    rank's gradient is a partial sum, which sum_replicated_grads_over_tp completes."""
    param.partial_grad_over_tp = True


def whole_vocab_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss with the whole vocabulary on this rank: torch's cross-entropy, in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


@functools.cache
def compiled_whole_vocab_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """whole_vocab_loss through inductor. Eager writes the logits out three more times in fp32 (the
    upcast, log-softmax's output, which the backward keeps, and its gradient) and the compiled loss
    none: one pass reads the logits for the log-sum-exp, one more in the backward writes their
    gradient in their own dtype. 2.3x faster on the CPU for 1,024 tokens x 32k vocabulary in fp32,
    4.6x from bf16 logits; under autocast it keeps 2 bytes per logit for the backward, not 4."""
    return torch.compile(whole_vocab_loss)


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Mean next-token loss from vocab-sharded logits [s, b, v/tp]; full logits are never gathered.
    compiled: with the whole vocabulary on this rank, compute it with compiled_whole_vocab_loss."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return (compiled_whole_vocab_loss() if compiled else whole_vocab_loss)(logits, labels)
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.contiguous())
    return per_token.mean()


def sum_replicated_grads_over_tp(model: torch.nn.Module, sequence_parallel: bool = True) -> None:
    """Under sequence parallelism each TP rank sees only its sequence shard, so the gradients of
    replicated parameters (the norms) are partial sums: add them up across the TP group as they
    are produced, before DeepSpeed reduces over data parallel. Without it, only the parameters
    marked by mark_partial_grad are partial (the full sequence, but this rank's heads)."""
    group = parallel_state.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    for param in model.parameters():
        if getattr(param, "tensor_model_parallel", False):
            continue
        if sequence_parallel:
            param.sequence_parallel = True
        if sequence_parallel or getattr(param, "partial_grad_over_tp", False):
            param.register_hook(all_reduce)
