"""Whether flash-attn can actually run here: importing its kernels proves the build matches this torch.

A flash_attn package built against another torch or CUDA is found by importlib but fails at import
(an undefined symbol: OSError or ImportError; a RuntimeError from its own checks). megatron-core
imports it optionally and catches only ImportError, so such a build would crash the import of the
whole model. The probe runs once, before megatron-core is imported (pretrain.parallel), and turns a
broken build into an absent one: attention falls back instead of crashing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys


@functools.cache
def flash_attn_importable() -> bool:
    """True only if flash_attn_varlen_func imports; a broken build is hidden from later imports."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        module = importlib.import_module("flash_attn")
        getattr(module, "flash_attn_varlen_func")
    except (ImportError, OSError, RuntimeError, AttributeError):
        for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
            del sys.modules[name]
        sys.modules["flash_attn"] = None  # type: ignore[assignment]  # later imports raise ImportError
        return False
    return True
