"""Sequence-parallel communication along dim 0 of [seq, batch, hidden] activations.

megatron-core has these mappings, but they allocate their buffers on CUDA
(`torch.cuda.current_device()`), so they cannot run on CPU with gloo. These are the smallest
device-agnostic equivalents; tests/test_tensor_parallel.py proves them equal to megatron-core's on
GPU. Each forward collective is paired with its adjoint in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _split(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)].contiguous()


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather the sequence shards. Backward: reduce-scatter the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: sum the partial results and keep this rank's shard. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _all_gather(grad, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's shard of a replicated tensor. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _all_gather(grad, ctx.group), None


def gather_from_sequence_parallel(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ReduceScatterToSequence.apply(x, group)


def scatter_to_sequence_parallel(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ScatterToSequence.apply(x, group)
