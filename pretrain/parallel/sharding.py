"""Full (TP=1) tensors <-> this rank's tensor-parallel shard.

Initialisation and checkpoints both work on full tensors, so the same seed and the same checkpoint
give the same model whatever the TP size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def partition_dim(param: torch.Tensor) -> int | None:
    """The dimension a parameter is split along across TP ranks, or None if it is replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def full_shape(param: torch.Tensor, local_shape: torch.Size | None = None) -> torch.Size:
    if local_shape is None:  # under ZeRO-3 param.shape is empty and ds_shape is the TP-local shape
        local_shape = getattr(param, "ds_shape", param.shape)
    shape = list(local_shape)
    dim = partition_dim(param)
    if dim is not None:
        shape[dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return torch.Size(shape)


def shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of a full tensor laid out like `param`."""
    dim = partition_dim(param)
    if dim is None:
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(tp, dim=dim)[parallel_state.get_tensor_model_parallel_rank()]


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a collective over `group` takes its tensors on: NCCL only moves CUDA tensors
    (this rank's GPU), gloo only CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """All-gather a TP shard (of a weight, or of its optimizer state) into the full tensor, on the
    TP group's device (where the collective runs; the caller moves it on from there)."""
    dim = partition_dim(param)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if dim is None or tp == 1:
        return local
    group = parallel_state.get_tensor_model_parallel_group()
    local = local.to(group_device(group)).contiguous()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=dim)
