"""Whether the transformer blocks and the loss are compiled (model.compile) when the config leaves it open."""

from __future__ import annotations

import functools

import torch

from pretrain.config import ConfigError


@functools.cache
def inductor_builds_cpu_kernels() -> bool:
    """Inductor writes C++ for the CPU and needs a compiler for it (g++, clang++ or $CXX). Asking
    inductor's own search finds the compiler it would use; without one, compiling would fail at the
    first step, so blocks stay eager."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or the search itself moved in another torch version
        return False
    return True


def resolve_compile(requested: bool | None, device: torch.device, zero_stage: int) -> bool:
    """model.compile, with None resolved to on wherever inductor can build kernels (Triton on CUDA,
    a C++ compiler on the CPU) and ZeRO is below 3: ZeRO-3's parameter-gathering hooks fire inside
    each block, and a compiled block would break its graph at every one of them.

    On the CPU the compiled blocks fuse RMSNorm, RoPE, SwiGLU and the residual adds: 1.06-1.10x the
    eager model's tokens/s in tools/benchmark.py (2 cores, fp32), for ~15 s of compiling on first
    use and ~5 s once inductor's on-disk cache holds the kernels."""
    cpu_without_compiler = device.type == "cpu" and not inductor_builds_cpu_kernels()
    if requested and cpu_without_compiler:
        raise ConfigError("config error: model.compile=true needs a C++ compiler on the CPU (inductor found none: "
                          "install g++ or clang++, or name one in $CXX); or set model.compile=false")
    if requested is not None:
        return requested
    return zero_stage < 3 and device.type in ("cuda", "cpu") and not cpu_without_compiler
