"""The DeepSpeed engine: ZeRO over the data-parallel group, mixed precision, clipping, AdamW.

The DeepSpeed config is generated from ours, so there is no JSON for users to keep in sync.
The optimizer is torch's AdamW handed to DeepSpeed (its fused/CPU Adam need compiled ops that
CPU-only machines lack); the learning rate is set by pretrain.train each step. torch's fused
implementation is used (CPU and CUDA): it reads a `found_inf` tensor, through which the loss
guard (pretrain/guard.py) skips a step on the device, and a `grad_scale` tensor, through which
ZeRO-0 clips inside the update (clip_grads).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from megatron.core import parallel_state

from pretrain.config import Config, engine_zero_stage
from pretrain.precision import bf16_weights


def deepspeed_config(cfg: Config, grad_accum: int, precision: str, parameters: int | None = None,
                     stage: int | None = None) -> dict[str, Any]:
    """parameters: the rank's parameter count (TP-local); buckets are capped at it, since DeepSpeed
    allocates a whole reduce bucket however few gradients it will hold (500M elements by default:
    2 GB per buffer for a model of a few million parameters). stage: the ZeRO stage to build
    (engine_zero_stage; default parallel.zero_stage)."""
    p = cfg.parallel
    stage = p.zero_stage if stage is None else stage
    reduce_bucket, allgather_bucket = p.reduce_bucket_size, p.allgather_bucket_size
    if parameters is not None:
        reduce_bucket, allgather_bucket = min(reduce_bucket, parameters), min(allgather_bucket, parameters)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Gather every parameter for compute; small params stay replicated only above this size.
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False,
                    stage3_prefetch_bucket_size=allgather_bucket)
    if stage in (1, 2):
        zero.update(reduce_scatter=True, allgather_bucket_size=allgather_bucket)
    if stage > 0:
        zero.update(overlap_comm=overlap_comm(cfg), contiguous_gradients=p.contiguous_gradients,
                    reduce_bucket_size=reduce_bucket)
    out = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        # Plain DeepSpeed (no ZeRO) reports no gradient norm, so pretrain.train computes it and clips
        # with it (clip_grads below); letting DeepSpeed clip too would compute it twice.
        "gradient_clipping": cfg.optim.grad_clip if stage > 0 else 0.0,
        "zero_optimization": zero,
        # bf16 weights under ZeRO only; ZeRO-0 keeps fp32 weights and autocasts (pretrain.precision).
        "bf16": {"enabled": bf16_weights(precision, stage)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronises the device around every
        # micro-batch (to time it); the loop reads the device once per log interval instead.
        "timers": {"throughput": {"enabled": False}},
    }
    if precision == "bf16":
        # DeepSpeed would otherwise accumulate micro-batch gradients and all-reduce them in bf16
        # (8 mantissa bits: small gradients vanish in the sum). ZeRO-0's gradients are fp32 already
        # (fp32 weights under autocast); it reduces them in this dtype too.
        out["communication_data_type"] = cfg.train.grad_reduce_dtype
        if stage > 0:
            out["data_types"] = {"grad_accum_dtype": cfg.train.grad_reduce_dtype}
    return out


def overlap_comm(cfg: Config) -> bool:
    """parallel.overlap_comm, with null meaning: on for CUDA (reductions overlap the backward on
    their own stream), off on CPU (no streams to overlap on, only extra copies)."""
    if cfg.parallel.overlap_comm is not None:
        return bool(cfg.parallel.overlap_comm)
    return cfg.train.device != "cpu" and torch.cuda.is_available()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linears, embeddings); leave norms' gains alone."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, cfg: Config, grad_accum: int, precision: str):
    import deepspeed

    from pretrain.console import DEEPSPEED_NOISE, drop_lines
    from pretrain.parallel.groups import MegatronMPU

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=True)
    with drop_lines(DEEPSPEED_NOISE):  # its CPU backend prints "... built successfully" on every rank
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: whole sizes
        stage = engine_zero_stage(cfg.parallel.zero_stage, parallel_state.get_data_parallel_world_size())
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=MegatronMPU(),
                                               config=deepspeed_config(cfg, grad_accum, precision, parameters, stage))
    if engine.zero_optimization_stage() == 0 and parallel_state.get_data_parallel_world_size() == 1:
        # One data-parallel rank has nothing to reduce; DeepSpeed would still flatten every gradient
        # into a bucket, "all-reduce" it and copy it back, three passes over the gradients per step.
        engine.enable_backward_allreduce = False
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (which hold the fp32 master partitions)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def set_lr(engine, lr: float) -> None:
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lr


def deepspeed_reports_grad_norm(engine) -> bool:
    """ZeRO's optimizers (bf16 weights included: pretrain.precision.bf16_weights) record the norm
    they clip with; the plain engine does not."""
    return engine.zero_optimization_stage() > 0


def clip_grads(optimizer: torch.optim.Optimizer, max_norm: float, norm: torch.Tensor) -> None:
    """Clip the gradients to a global norm of at most max_norm (0 = no clipping) in the next step of
    fused AdamW (base_optimizer), given their norm (grad_norm_tensor); for engines that do not clip
    (deepspeed_reports_grad_norm false), so the norm is computed once per step. Fused AdamW divides
    each gradient by its `grad_scale` tensor as it reads it (and writes the clipped gradient back),
    so clipping takes one write of the gradients inside the update instead of a pass of its own
    that reads and writes them all (a multiply: 2.5% of the 1b preset's step on an H100), and
    reads the norm on the device, with no sync. Call between backward and step."""
    scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0) if max_norm > 0 else None
    optimizer.grad_scale = scale  # type: ignore[attr-defined]


def grad_norm(engine) -> float:
    return float(grad_norm_tensor(engine))


def grad_norm_tensor(engine) -> torch.Tensor:
    """Global gradient norm of the DP-reduced gradients (call between backward and step),
    counting TP-replicated parameters once, as DeepSpeed does; on the device, no sync."""
    counted = [p.grad for p in engine.module.parameters() if p.grad is not None and (
        getattr(p, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0)]
    device = next(engine.module.parameters()).device
    local = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros((), device=device)
    total = local.float().pow(2)
    torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total.sqrt()
