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
