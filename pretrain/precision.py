"""The numeric precision a run trains in, decided once from the config and the device."""

from __future__ import annotations

import torch


def bf16_supported(device: torch.device) -> bool:
    """bf16 compute needs Ampere or newer on CUDA (and a CPU build of torch emulates it, slowly)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU whose tensor cores run it, else fp32; an explicit choice is kept."""
    if requested == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return requested


def configure_matmul_precision(precision: str, device: torch.device) -> None:
    """fp32 on CUDA runs its matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs,
    fp32 accumulation): several times the fp32 rate, the usual trade for training. On CPU nothing
    changes ('highest' is torch's default)."""
    if device.type == "cuda" and precision == "fp32":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def bf16_weights(precision: str, engine_stage: int) -> bool:
    """Whether the model's weights are bf16 (DeepSpeed's bf16 mode, under ZeRO) or stay fp32.

    Under ZeRO, DeepSpeed keeps bf16 weights and partitions their fp32 master copies, gradient
    accumulators and Adam moments over the data-parallel ranks: that is where its memory saving is.
    Without ZeRO its only bf16 wrapper is a per-parameter loop that accumulates gradients in bf16
    and reads every gradient back to the host to look for overflow (a host sync per parameter, per
    step). So ZeRO-0 runs bf16 the way torch's own mixed precision does instead: fp32 weights,
    gradients and moments in the plain engine (one fused AdamW, no copies), with the forward under
    autocast, which runs the matmuls and attention in bf16 (GPT's `autocast` argument)."""
    return precision == "bf16" and engine_stage > 0


def autocast_dtype(precision: str, engine_stage: int) -> torch.dtype | None:
    """The dtype the forward autocasts to (bf16 over fp32 weights, see bf16_weights), or None."""
    return torch.bfloat16 if precision == "bf16" and not bf16_weights(precision, engine_stage) else None


def describe_precision(precision: str, engine_stage: int) -> str:
    """The startup block's precision: which of the two bf16 modes a run is in."""
    if precision != "bf16":
        return precision
    return "bf16 weights, fp32 master (ZeRO)" if bf16_weights(precision, engine_stage) else "bf16 autocast, fp32 weights"
