"""Weight initialisation that depends only on (seed, parameter name), never on the layout.

Each parameter's full tensor (each part of a fused one) is drawn from its own generator and this rank keeps its TP shard,
so TP=1 and TP=4 runs with the same seed start from the same model.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn

from pretrain.parallel.sharding import full_shape, logical_shapes, merge_full, shard
from pretrain.parallel.zero3 import is_partitioned, write_partition


def _std(name: str, init_std: float, num_layers: int) -> float:
    # Projections that write into the residual stream are scaled down so the stream's variance
    # does not grow with depth (GPT-2's 1/sqrt(2 * layers)).
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return init_std / math.sqrt(2 * num_layers)
    return init_std


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, init_std: float, num_layers: int) -> None:
    for name, param in model.named_parameters():
        if "norm" in name:
            full = torch.ones(full_shape(param), dtype=torch.float32)
        elif name.endswith(".bias"):  # q/k/v biases (model.qkv_bias) start at zero
            full = torch.zeros(full_shape(param), dtype=torch.float32)
        else:
            parts = []
            for part_name, shape in logical_shapes(name, param):  # fused q/k/v: each part as if unfused
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(part_name.encode()))
                parts.append(torch.empty(shape, dtype=torch.float32).normal_(
                    0.0, _std(part_name, init_std, num_layers), generator=generator))
            full = merge_full(param, parts)
        if is_partitioned(param):  # built under ZeRO-3's zero.Init: write this rank's partition only
            write_partition(param, shard(full, param))
        else:
            param.copy_(shard(full, param))


def count_parameters(model: nn.Module) -> int:
    """Parameters of the full (unsharded) model."""
    return sum(full_shape(p).numel() for p in model.parameters())
