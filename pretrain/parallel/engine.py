"""The DeepSpeed engine: ZeRO over the data-parallel group, mixed precision, clipping, AdamW.

The DeepSpeed config is generated from ours, so there is no JSON for users to keep in sync.
The optimizer is torch's AdamW handed to DeepSpeed (its fused/CPU Adam need compiled ops that
CPU-only machines lack); the learning rate is set by pretrain.train each step. torch's fused
implementation is used (CPU and CUDA): it reads a `found_inf` tensor, through which the loss
guard (pretrain/guard.py) skips a step on the device.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pretrain.config import Config


def deepspeed_config(cfg: Config, grad_accum: int, precision: str) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage == 3:
        # Gather every parameter for compute; small params stay replicated only above this size.
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    if cfg.parallel.zero_stage in (1, 2):
        zero.update(reduce_scatter=True, overlap_comm=False, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linears, embeddings); leave norms' gains alone."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, cfg: Config, grad_accum: int, precision: str):
    import deepspeed

    from pretrain.parallel.groups import MegatronMPU

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, grad_accum, precision), mpu=MegatronMPU())
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (which hold the fp32 master partitions)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def set_lr(engine, lr: float) -> None:
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lr


def deepspeed_reports_grad_norm(engine) -> bool:
    """ZeRO and bf16 wrappers record the norm they clip with; plain fp32 DeepSpeed does not."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()


def grad_norm(engine) -> float:
    return float(grad_norm_tensor(engine))


def grad_norm_tensor(engine) -> torch.Tensor:
    """Global gradient norm of the DP-reduced gradients (call between backward and step),
    counting TP-replicated parameters once, as DeepSpeed does; on the device, no sync."""
    from megatron.core import parallel_state

    counted = [p.grad for p in engine.module.parameters() if p.grad is not None and (
        getattr(p, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0)]
    device = next(engine.module.parameters()).device
    local = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros((), device=device)
    total = local.float().pow(2)
    torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total.sqrt()
