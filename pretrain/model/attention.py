"""Causal self-attention over packed documents: flash-attn (varlen), FlexAttention or SDPA.

Packed sequences hold several documents; position_ids restart at 0 where a document starts, and
no token attends across that boundary. Each kernel takes the boundaries in its own form
(flash-attn: cumulative sequence lengths; FlexAttention: a block mask; SDPA: a dense mask, or none
at all when every row is one document). That form is built once per batch by `documents()`, in
GPT.forward, and handed to every layer: layers never look at position_ids, so they never wait for
the host. Building it costs at most one host sync per batch, and none when position_ids are on
the CPU (as the data loader makes them).

    auto   flash-attn when it imports and the run is bf16 on CUDA; else on CUDA `flex`; else `sdpa`
    flash  flash-attn's varlen kernel (the `gpu` extra)
    flex   FlexAttention with a document-causal block mask for batches with boundaries, and SDPA's
           causal flash/cuDNN kernel for batches of whole documents. Trains only on CUDA (torch has
           no FlexAttention backward on CPU).
    sdpa   scaled_dot_product_attention: is_causal for whole documents, a dense [b, s, s] mask
           otherwise (fine on CPU; on CUDA the mask rules out the fast kernels)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from pretrain.config import ConfigError

BACKENDS = ("auto", "flash", "flex", "sdpa")
FLEX_BLOCK = 128  # FlexAttention's default block: the sequence lengths its compiled kernel is used for


@dataclass(frozen=True)
class Documents:
    """The document boundaries of one batch, in the form the chosen kernel reads."""
    single: bool
    """Every row is one document (no position restarts after column 0): plain causal attention."""
    mask: torch.Tensor | None = None
    """sdpa: [b, 1, s, s] bool, True where a query may attend a key."""
    block_mask: Any = None
    """flex: a BlockMask of the document-causal pattern."""
    cu_seqlens: torch.Tensor | None = None
    """flash: int32 offsets of each document in the flattened [b * s] batch, ending with b * s."""
    max_seqlen: int = 0
    """flash: the longest document."""


class AttentionKernel(Protocol):
    def documents(self, position_ids: torch.Tensor | None, device: torch.device) -> Documents:
        """The boundaries of a batch (position_ids [b, s] on any device, None = one document per
        row), placed on `device`, where the model runs."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
        """q [b, s, hq, d], k/v [b, s, hkv, d] -> [b, s, hq, d]."""


def flash_attn_available() -> bool:
    """flash-attn is importable (a build against another torch fails here, not at the first step)."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # an ABI mismatch raises ImportError or OSError, sometimes RuntimeError
        return False
    return True


def resolve_backend(requested: str, device: torch.device, precision: str) -> str:
    """flash-attn kernels take only 16-bit inputs, so `auto` picks them for bf16 on CUDA."""
    flash_usable = device.type == "cuda" and precision == "bf16" and flash_attn_available()
    if requested == "auto":
        if flash_usable:
            return "flash"
        return "flex" if device.type == "cuda" else "sdpa"
    if requested == "flash" and not flash_usable:
        raise ConfigError("config error: model.attention=flash needs CUDA, bf16 (train.precision) and the "
                          "flash-attn package (pip install '.[gpu]'); use model.attention=sdpa")
    if requested == "flex" and device.type != "cuda":
        raise ConfigError("config error: model.attention=flex trains only on CUDA (torch has no FlexAttention "
                          "backward on CPU); use model.attention=sdpa")
    return requested


def _single_document(position_ids: torch.Tensor | None) -> bool:
    # One host sync per batch when position_ids live on a GPU; none on the CPU.
    return position_ids is None or bool((position_ids[:, 1:] != 0).all())


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait for the device's queue: a copy from
    pageable memory first synchronises the stream, one from pinned memory runs asynchronously."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] number of each token's document within its row (1, 1, 2, 2, 2, 3, ...)."""
    return torch.cumsum((position_ids == 0).int(), dim=1)


def _gqa_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """SDPA on [b, h, s, d] with fewer k/v heads than q heads, without falling back to the math kernel.

    On CUDA only the flash kernel (16-bit) takes grouped k/v; for fp32 the memory-efficient kernel
    needs them repeated, which costs far less than the math kernel's [s, s] scores."""
    if q.shape[1] != k.shape[1] and q.is_cuda and q.dtype == torch.float32:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kwargs)


class SDPAKernel:
    name = "sdpa"

    def documents(self, position_ids: torch.Tensor | None, device: torch.device) -> Documents:
        if _single_document(position_ids):
            return Documents(single=True)
        docs = document_ids(to_device(position_ids, device))
        seq = docs.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        return Documents(single=False, mask=((docs[:, :, None] == docs[:, None, :]) & causal)[:, None])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if docs.single:
            out = _gqa_sdpa(q, k, v, is_causal=True)
        else:
            out = _gqa_sdpa(q, k, v, attn_mask=docs.mask)
        return out.transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention is fast only compiled (eagerly it materialises the scores).
    return torch.compile(flex_attention, dynamic=False)


def document_block_mask(position_ids: torch.Tensor, device: torch.device):
    """FlexAttention's BlockMask for causal attention within documents: fully masked blocks are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = to_device(document_ids(position_ids), device)
    batch, seq = docs.shape

    def document_causal(b, h, q_idx, kv_idx):
        return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(document_causal, batch, None, seq, seq, device=device)


class FlexKernel:
    """FlexAttention for batches with document boundaries; SDPA's causal kernel for whole documents."""
    name = "flex"

    def __init__(self, compiled: bool = True) -> None:
        self.compiled = compiled

    def documents(self, position_ids: torch.Tensor | None, device: torch.device) -> Documents:
        if _single_document(position_ids):
            return Documents(single=True)
        if position_ids.shape[1] % FLEX_BLOCK:
            # Measured on an H200 with torch 2.11: compiled FlexAttention finds no kernel for 48 tokens
            # (NoValidChoicesError) and compiles for 256 and 2048. Lengths off its 128-token block
            # take SDPA's dense mask: correct, and such short sequences are not where time goes.
            return SDPAKernel().documents(position_ids, device)
        return Documents(single=False, block_mask=document_block_mask(position_ids, device))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if docs.single:
            out = _gqa_sdpa(q, k, v, is_causal=True)
        elif docs.mask is not None:
            out = _gqa_sdpa(q, k, v, attn_mask=docs.mask)
        else:
            from torch.nn.attention.flex_attention import flex_attention

            attend = _compiled_flex() if self.compiled else flex_attention
            out = attend(q, k, v, block_mask=docs.block_mask, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)


class FlashKernel:
    name = "flash"

    def documents(self, position_ids: torch.Tensor | None, device: torch.device) -> Documents:
        if _single_document(position_ids):
            return Documents(single=True)
        batch, seq = position_ids.shape
        starts = position_ids == 0
        starts[:, 0] = True
        offsets = torch.nonzero(starts.flatten()).flatten()
        ends = torch.cat([offsets, offsets.new_tensor([batch * seq])])
        max_seqlen = int((ends[1:] - ends[:-1]).max())  # the same host sync as nonzero's
        return Documents(single=False, cu_seqlens=to_device(ends.to(torch.int32), device),
                         max_seqlen=max_seqlen)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if docs.single:
            return flash_attn_func(q, k, v, causal=True)
        b, s, hq, d = q.shape
        out = flash_attn_varlen_func(q.reshape(b * s, hq, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d),
                                     docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen,
                                     causal=True)
        return out.view(b, s, hq, d)


def attention_kernel(backend: str) -> AttentionKernel:
    """The kernel for a resolved backend name (see resolve_backend)."""
    kernels = {"sdpa": SDPAKernel, "flex": FlexKernel, "flash": FlashKernel}
    if backend not in kernels:
        raise ValueError(f"attention backend {backend!r}: resolve it first; one of {', '.join(kernels)}")
    return kernels[backend]()
