"""Full (TP=1) tensors <-> this rank's tensor-parallel shard, and fused weights <-> their parts.

Initialisation and checkpoints both work on full tensors, so the same seed and the same checkpoint
give the same model whatever the TP size.

A fused column-parallel weight (q, k and v in one matrix, or gate and up) is split over TP ranks
part by part: each rank holds [q_r; k_r; v_r], its own heads of each part, so one matmul yields
this rank's q, k and v. Its full tensor is the parts' full tensors stacked ([q; k; v]), whatever
the TP size, and checkpoints store each part under its own name (`q_proj.weight`, ...): a fused
and an unfused model read and write the same checkpoint.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def partition_dim(param: torch.Tensor) -> int | None:
    """The dimension a parameter is split along across TP ranks, or None if it is replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def mark_fused(param: torch.Tensor, parts: tuple[tuple[str, int], ...]) -> None:
    """Record that `param` stacks several column-parallel weights: ((module name, full rows), ...)."""
    param.fused_parts = tuple(parts)


def fused_parts(param: torch.Tensor) -> tuple[tuple[str, int], ...] | None:
    return getattr(param, "fused_parts", None)


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
    rank = parallel_state.get_tensor_model_parallel_rank()
    parts = fused_parts(param)
    if parts is None:
        return full.chunk(tp, dim=dim)[rank]
    pieces = full.split([rows for _, rows in parts], dim=dim)
    return torch.cat([piece.chunk(tp, dim=dim)[rank] for piece in pieces], dim=dim)


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
    ranks = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(ranks, local, group=group)
    parts = fused_parts(param)
    if parts is None:
        return torch.cat(ranks, dim=dim)
    local_rows = [rows // tp for _, rows in parts]
    per_rank = [r.split(local_rows, dim=dim) for r in ranks]
    return torch.cat([torch.cat([pieces[i] for pieces in per_rank], dim=dim) for i in range(len(parts))], dim=dim)


def logical_names(name: str, param: torch.Tensor) -> list[str]:
    """The checkpoint names a parameter is stored under: its own, or one per fused part."""
    parts = fused_parts(param)
    if parts is None:
        return [name]
    module, leaf = name.rsplit(".", 2)[0], name.rsplit(".", 1)[1]
    return [f"{module}.{part}.{leaf}" for part, _ in parts]


def split_full(name: str, param: torch.Tensor, full: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for each part of a full parameter (itself when not fused)."""
    parts = fused_parts(param)
    if parts is None:
        yield name, full
        return
    dim = partition_dim(param) or 0
    yield from zip(logical_names(name, param), full.split([rows for _, rows in parts], dim=dim))


def logical_shapes(name: str, param: torch.Tensor) -> list[tuple[str, torch.Size]]:
    shape = full_shape(param)
    parts = fused_parts(param)
    if parts is None:
        return [(name, shape)]
    dim = partition_dim(param) or 0
    return [(n, torch.Size([*shape[:dim], rows, *shape[dim + 1:]]))
            for n, (_, rows) in zip(logical_names(name, param), parts)]


def merge_full(param: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """The full parameter from its parts' full tensors (the inverse of split_full)."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=partition_dim(param) or 0)
