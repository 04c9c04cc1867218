"""model.compile's default: compiled blocks wherever inductor can build kernels, eager elsewhere,
and a one-line error for an explicit request that cannot be met."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.compiling import inductor_builds_cpu_kernels, resolve_compile

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_default_compiles_below_zero_3_where_inductor_builds_kernels() -> None:
    compiler = inductor_builds_cpu_kernels()
    for stage in (0, 1, 2):
        assert resolve_compile(None, CPU, stage) is compiler
        assert resolve_compile(None, CUDA, stage) is True  # Triton ships with torch's CUDA builds
    assert resolve_compile(None, CPU, 3) is False and resolve_compile(None, CUDA, 3) is False
    assert resolve_compile(False, CPU, 0) is False and resolve_compile(True, CUDA, 3) is True
    if compiler:
        assert resolve_compile(True, CPU, 3) is True


def test_a_cpu_without_a_compiler_stays_eager_and_refuses_compile_true() -> None:
    """Inductor is pointed at a C++ compiler that does not exist (its own cpp.cxx setting: a $CXX
    set for the whole process would stop DeepSpeed's op builds as well)."""
    from torch._inductor import config as inductor_config

    inductor_builds_cpu_kernels.cache_clear()
    try:
        with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
            assert inductor_builds_cpu_kernels() is False
            assert resolve_compile(None, CPU, 0) is False and resolve_compile(False, CPU, 0) is False
            with pytest.raises(ConfigError, match=r"model.compile=true needs a C\+\+ compiler .* model.compile=false"):
                resolve_compile(True, CPU, 0)
            assert resolve_compile(None, CUDA, 0) is True  # CUDA kernels come from Triton, not a C++ compiler
    finally:
        inductor_builds_cpu_kernels.cache_clear()
    # back on this machine's own setting: inductor's Linux default, g++ unless $CXX names another
    assert inductor_builds_cpu_kernels() is (shutil.which(os.environ.get("CXX", "g++")) is not None)
