"""Precision and kernel choices made from what the machine actually supports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_auto_precision_is_fp32_on_cpu_and_explicit_choices_stand() -> None:
    from pretrain.precision import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_cpu_fp32_matmuls_stay_full_precision() -> None:
    from pretrain.precision import configure_matmul_precision

    before = torch.get_float32_matmul_precision()
    configure_matmul_precision("fp32", torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize("error", ["OSError('undefined symbol: _ZN3c10')", "ImportError('DLL load failed')",
                                   "RuntimeError('FlashAttention only supports Ampere GPUs or newer')"])
def test_a_broken_flash_attn_build_counts_as_absent(tmp_path: Path, error: str) -> None:
    # A flash_attn package that importlib finds but that fails to import, like a wheel built
    # against another torch: detection must say "absent" so attention falls back instead of crashing.
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(f"raise {error}\n")
    # Importing the model imports megatron-core, which imports flash_attn optionally itself.
    probe = ("import importlib.util; print(importlib.util.find_spec('flash_attn') is not None); "
             "import pretrain.model; from pretrain.flash import flash_attn_importable; print(flash_attn_importable())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["True", "False"]


def test_a_working_flash_attn_package_is_detected(tmp_path: Path) -> None:
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text("def flash_attn_varlen_func(*args, **kwargs):\n    pass\n")
    probe = "from pretrain.flash import flash_attn_importable; print(flash_attn_importable())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out == ["True"]


@pytest.mark.gpu
def test_auto_precision_on_cuda_follows_bf16_support() -> None:
    from pretrain.precision import resolve_precision

    want = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == want


@pytest.mark.gpu
def test_cuda_fp32_uses_tf32_matmuls() -> None:
    from pretrain.precision import configure_matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        configure_matmul_precision("fp32", torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
