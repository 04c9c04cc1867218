"""Read and write one parameter's full fp32 value and Adam moments under any ZeRO stage.

Two cases, by what holds the fp32 master weights and the Adam state:
- ZeRO 1-3 (bf16 weights, or fp32 under ZeRO): DeepSpeed's partitions, reached through its
  safe_{get,set}_full_* functions (the parameter has `ds_id` or `_hp_mapping`);
- ZeRO-0, fp32 or bf16 autocast (pretrain.precision): the fp32 parameter itself and torch's
  optimizer state.
Values are returned on the device they live on (a GPU under NCCL) and are TP-local:
pretrain.parallel.sharding turns them into full tensors and back.
"""

from __future__ import annotations

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state)

from pretrain.checkpoint.format import MOMENTS
from pretrain.parallel.engine import base_optimizer
from pretrain.parallel.zero3 import is_partitioned, write_partition

__all__ = ["MOMENTS", "get_param", "get_moment", "set_param", "set_moment", "optimizer_step", "set_optimizer_step",
           "materialize_optimizer_state"]


def get_param(engine, param: torch.nn.Parameter) -> torch.Tensor:
    value = safe_get_full_fp32_param(param)
    return (value if value is not None else param.detach()).float()


def get_moment(engine, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    value = safe_get_full_optimizer_state(param, key)
    if value is None:
        value = base_optimizer(engine).state[param][key]
    return value.float()


def set_param(engine, param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the fp32 master (wherever it lives) and the compute copy the next forward uses, so a
    loaded or imported weight survives the next optimizer step."""
    value = value.to(param.device, torch.float32)
    if is_partitioned(param):  # ZeRO-3: fp32 master partition, then this rank's compute partition
        safe_set_full_fp32_param(param, value)
        write_partition(param, value)
        return
    if hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, value)
    param.data.copy_(value.to(param.dtype))


def set_moment(engine, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    value = value.to(param.device, torch.float32)
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        safe_set_full_optimizer_state(param, value, key)
    else:
        base_optimizer(engine).state[param][key].copy_(value)


def optimizer_step(engine) -> int:
    """Adam's step count (skipped steps do not count), read from the optimizer state."""
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step(engine, step: int) -> None:
    for state in base_optimizer(engine).state.values():
        if "step" in state:
            state["step"] = torch.tensor(float(step), dtype=state["step"].dtype, device=state["step"].device) \
                if torch.is_tensor(state["step"]) else step


@torch.no_grad()
def materialize_optimizer_state(engine) -> None:
    """Create every Adam moment now, before the first step.

    torch's AdamW creates its state lazily, and DeepSpeed's ZeRO-1/2 links its per-parameter views
    of that state right after its first step, one param group at a time; a group whose state did
    not exist yet at that moment (our no-decay group) is never linked, so its moments could not be
    saved. One step of the base optimizer with zero gradients and lr=0 creates all state and changes
    no weight (AdamW's update and decoupled decay are both multiplied by lr); the step counts go
    back to 0. Called once when the engine is built.

    ZeRO-3 hands its fp32 partitions to the base optimizer only for the duration of each step
    (its param groups are empty otherwise), so they are put in place around this step too.
    """
    optimizer = base_optimizer(engine)
    zero3 = getattr(engine.optimizer, "_set_fp32_optimizer_param_groups", None)
    if zero3 is not None:
        zero3()
    saved_lrs = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_grads = [p.grad for p in params]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, grad in zip(params, saved_grads):
        p.grad = grad
    for group, lr in zip(optimizer.param_groups, saved_lrs):
        group["lr"] = lr
    if zero3 is not None:
        engine.optimizer._clear_fp32_optimizer_param_groups()
    set_optimizer_step(engine, 0)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2: link every group's state now that it all exists
        link()
