"""Process groups: one data-parallel x tensor-parallel grid from megatron-core's parallel_state."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return requested


def init_distributed(tp: int, device_kind: str, timeout_minutes: int = 10) -> ParallelDims:
    """Join the job started by torchrun (or run alone), then build the TP x DP grid."""
    alone = os.environ.get("WORLD_SIZE", "1") == "1"  # `python -m pretrain.train`, build() in-process, torchrun -n 1
    if alone:
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # A world of one meets in an in-process store: no port to pick, so none another process can take first.
        store = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if alone else {}
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes), **store)
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"config error: parallel.tp: world size {world} is not a multiple of parallel.tp={tp}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 distributed_timeout_minutes=timeout_minutes)
    return ParallelDims(
        world_size=world, rank=dist.get_rank(), local_rank=local_rank, tp=tp, dp=world // tp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(), device=device,
    )


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """The `mpu` interface DeepSpeed calls, answered by megatron-core's parallel_state.

    DeepSpeed asks for get_model_parallel_* / get_data_parallel_*, names parallel_state no longer
    has, so ZeRO would otherwise shard over the whole world instead of the data-parallel group.
    """

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
