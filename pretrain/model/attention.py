"""Causal self-attention kernels: flash-attn (varlen) or PyTorch SDPA, both document-masked.

Packed sequences hold several documents; position_ids restart at 0 where a document starts, and
no token attends across that boundary. flash-attn's varlen kernel gets this for free from
cumulative sequence lengths; SDPA gets an explicit block-diagonal causal mask only when a batch
actually contains a boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flash_attn_available() -> bool:
    from pretrain.flash import flash_attn_importable

    return torch.cuda.is_available() and flash_attn_importable()


def resolve_backend(requested: str, device: torch.device, precision: str) -> str:
    """flash-attn kernels take only 16-bit inputs, so `auto` picks them for bf16 on CUDA."""
    usable = device.type == "cuda" and flash_attn_available() and precision == "bf16"
    if requested == "auto":
        return "flash" if usable else "sdpa"
    if requested == "flash" and not usable:
        raise RuntimeError("model.attention=flash needs CUDA, bf16 (train.precision) and the flash-attn "
                           "package (pip install '.[gpu]'); use model.attention=sdpa")
    return requested


def _document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    return torch.cumsum((position_ids == 0).int(), dim=1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   position_ids: torch.Tensor | None) -> torch.Tensor:
    """q [b, s, hq, d], k/v [b, s, hkv, d] -> [b, s, hq, d]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    single_document = position_ids is None or bool((position_ids[:, 1:] != 0).all())
    if single_document:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        docs = _document_ids(position_ids)
        seq = q.shape[2]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
        mask = (docs[:, :, None] == docs[:, None, :]) & causal  # [b, s, s]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    return out.transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    position_ids: torch.Tensor | None) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    b, s, hq, d = q.shape
    if position_ids is None or bool((position_ids[:, 1:] != 0).all()):
        return flash_attn_func(q, k, v, causal=True)
    starts = position_ids == 0
    starts[:, 0] = True
    offsets = torch.nonzero(starts.flatten(), as_tuple=False).flatten().to(torch.int32)
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([b * s])])
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = flash_attn_varlen_func(q.reshape(b * s, hq, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d),
                                 cu_seqlens, cu_seqlens, max_len, max_len, causal=True)
    return out.view(b, s, hq, d)


ATTENTION = {"sdpa": sdpa_attention, "flash": flash_attention}
