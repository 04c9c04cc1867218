"""Every random number generator a rank draws from, as tensors for a safetensors file.

A resumed run continues bit-exactly only if every generator continues where it stopped: torch's
CPU generator, the generator of this rank's GPU when CUDA is in use, Python's `random` and NumPy's
global generator (data code and libraries may draw from either). Saved per rank; restored only
when the layout is unchanged, since another world size has other ranks.
"""

from __future__ import annotations

import random

import numpy as np
import torch

CPU, CUDA, PYTHON, NUMPY_KEYS, NUMPY_POS = "torch_cpu", "torch_cuda", "python", "numpy_keys", "numpy_pos"


def cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def rng_state() -> dict[str, torch.Tensor]:
    """The state of every generator in use by this process."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out = {CPU: torch.get_rng_state(),
           PYTHON: torch.tensor([version, *internal], dtype=torch.int64),
           NUMPY_KEYS: torch.from_numpy(keys.astype(np.int64)),
           NUMPY_POS: torch.tensor([pos, has_gauss, cached], dtype=torch.float64)}
    if gauss is not None:
        out["python_gauss"] = torch.tensor([gauss], dtype=torch.float64)
    if cuda_in_use():
        out[CUDA] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what rng_state() returned (generators missing from an older checkpoint are left as they are)."""
    torch.set_rng_state(state[CPU])
    if PYTHON in state:
        version, *internal = state[PYTHON].tolist()
        gauss = float(state["python_gauss"]) if "python_gauss" in state else None
        random.setstate((version, tuple(internal), gauss))
    if NUMPY_KEYS in state:
        pos, has_gauss, cached = state[NUMPY_POS].tolist()
        np.random.set_state(("MT19937", state[NUMPY_KEYS].numpy().astype(np.uint32), int(pos), int(has_gauss),
                             cached))
    if CUDA in state and cuda_in_use():
        torch.cuda.set_rng_state(state[CUDA], torch.cuda.current_device())
