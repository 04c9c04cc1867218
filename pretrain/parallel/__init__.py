"""Parallel layout: process groups, tensor/sequence-parallel layers, the DeepSpeed engine."""

import os
import warnings

import torch

# DeepSpeed picks its accelerator at import time; without CUDA it must be told to use the CPU one.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# A flash-attn build that does not match this torch must look absent before megatron-core imports it.
from pretrain.flash import flash_attn_importable  # noqa: E402

flash_attn_importable()
# megatron-core warns at import that optional CUDA extensions are absent; we use none of them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
# DeepSpeed still calls all_gather_into_tensor / reduce_scatter_tensor, deprecated in recent torch.
warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
