"""Every attention kernel computes causal attention within each packed document, and nothing more.

The reference attends document by document with plain softmax arithmetic (no kernel, no mask
tensor): each kernel must match it, forward and gradients, with grouped-query attention and rows
that hold different numbers of documents. FlexAttention has no backward on CPU, so there its
forward is compared here and its gradients in the `gpu` test, which also makes flash-attn, Flex
and SDPA agree on CUDA in bf16.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.model.attention import (Documents, FlexKernel, SDPAKernel, attention_kernel, document_ids,
                                      resolve_backend)

# Rows of one packed batch: rows of one document, rows cut into several (down to one token), and a
# batch mixing both (single-document rows then take the masked path with the rest).
ROWS = {"one-document": [[48], [48]], "several": [[10, 22, 16], [5, 15, 12, 16]],
        "mixed": [[48], [1, 30, 17]]}
GPU_ROWS = {"one-document": [[256], [256]], "several": [[40, 88, 128], [20, 60, 48, 128]],
            "mixed": [[256], [1, 130, 125]], "short": [[10, 22, 16], [5, 15, 12, 16]]}


def positions(row_lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in row_lengths])


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_lengths: list[list[int]]) -> torch.Tensor:
    """q [b, s, hq, d], k/v [b, s, hkv, d]: softmax attention, causal, one document at a time."""
    groups = q.shape[2] // k.shape[2]
    rows = []
    for b, lengths in enumerate(row_lengths):
        outs, start = [], 0
        for n in lengths:
            qd = q[b, start:start + n].transpose(0, 1)  # [hq, n, d]
            kd, vd = (t[b, start:start + n].transpose(0, 1).repeat_interleave(groups, dim=0) for t in (k, v))
            scores = qd @ kd.transpose(1, 2) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            outs.append((scores.softmax(-1) @ vd).transpose(0, 1))
            start += n
        rows.append(torch.cat(outs))
    return torch.stack(rows)


def qkv(heads: int, kv_heads: int, seq: int = 48, batch: int = 2, dtype=torch.float32, device="cpu",
        head_dim: int = 16):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    shapes = [(batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim), (batch, seq, kv_heads, head_dim)]
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("rows", ROWS, ids=list(ROWS))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_sdpa_matches_per_document_attention(rows: str, heads: tuple[int, int]) -> None:
    kernel = SDPAKernel()
    q, k, v = qkv(*heads)
    docs = kernel.documents(positions(ROWS[rows]), torch.device("cpu"))
    assert docs.single == (rows == "one-document")
    out = kernel(q, k, v, docs)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    expected_out = reference(q, k, v, ROWS[rows])
    expected = torch.autograd.grad(expected_out, (q, k, v), grad)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"d{name}")


# 128 tokens: FlexAttention's block; 48 tokens is off it, where the flex kernel takes SDPA's dense mask.
FLEX_ROWS = {"one-document": [[128], [128]], "several": [[40, 60, 28], [20, 60, 48]], "mixed": [[128], [1, 90, 37]],
             "off-block": ROWS["several"]}


@pytest.mark.parametrize("rows", FLEX_ROWS, ids=list(FLEX_ROWS))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_flex_forward_matches_per_document_attention(rows: str, heads: tuple[int, int]) -> None:
    """FlexAttention's block mask (eager, as its compiled form has no CPU backward to train with)."""
    kernel = FlexKernel(compiled=False)
    lengths = FLEX_ROWS[rows]
    q, k, v = (t.detach() for t in qkv(*heads, seq=sum(lengths[0])))
    docs = kernel.documents(positions(lengths), torch.device("cpu"))
    assert (docs.block_mask is not None) == (rows in ("several", "mixed"))
    assert (docs.mask is not None) == (rows == "off-block")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        out = kernel(q, k, v, docs)
    torch.testing.assert_close(out, reference(q, k, v, lengths), rtol=1e-5, atol=1e-5)


def test_document_ids_number_documents_within_each_row() -> None:
    assert document_ids(positions([[2, 3], [1, 1, 3]])).tolist() == [[1, 1, 2, 2, 2], [1, 2, 3, 3, 3]]


class CountingKernel(SDPAKernel):
    """SDPA that records how often boundaries are computed and which object each layer receives."""

    def __init__(self) -> None:
        self.documents_calls, self.seen = 0, []

    def documents(self, position_ids, device):
        self.documents_calls += 1
        return super().documents(position_ids, device)

    def __call__(self, q, k, v, docs: Documents):
        self.seen.append(docs)
        return super().__call__(q, k, v, docs)


def test_boundaries_are_computed_once_per_batch_for_all_layers() -> None:
    """Layers never see position_ids: GPT computes the boundaries once and every layer reads them."""
    import dataclasses

    import torch.distributed as dist
    from megatron.core import parallel_state

    from helpers import TINY
    from pretrain.config import compose
    from pretrain.model import GPT, init_weights

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        cfg = dataclasses.replace(compose([*TINY, "model.num_layers=3"]).model)
        kernel = CountingKernel()
        model = GPT(cfg, attention=kernel)
        init_weights(model, 0, cfg.init_std, cfg.num_layers)
        ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))
        model(ids, ids, positions(ROWS["several"])).backward()
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
    assert kernel.documents_calls == 1
    assert len(kernel.seen) == 3 and all(d is kernel.seen[0] for d in kernel.seen)
    assert kernel.seen[0].mask is not None and not kernel.seen[0].single


def test_backend_choice_follows_device_and_precision() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, "fp32") == "sdpa"
    assert resolve_backend("auto", cpu, "bf16") == "sdpa"
    assert resolve_backend("sdpa", cpu, "bf16") == "sdpa"
    with pytest.raises(ConfigError, match="model.attention=sdpa"):
        resolve_backend("flash", cpu, "bf16")
    with pytest.raises(ConfigError, match="model.attention=sdpa"):
        resolve_backend("flex", cpu, "fp32")
    if not torch.cuda.is_available():
        return
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, "fp32") == "flex"  # flash-attn takes no fp32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", GPU_ROWS, ids=list(GPU_ROWS))
def test_flash_flex_and_sdpa_agree_on_cuda_in_bf16(rows: str) -> None:
    """bf16 kernels against the fp32 per-document reference, forward and gradients. Tolerances are
    bf16's: its 8-bit mantissa gives ~1e-2 relative error after a softmax and a weighted sum."""
    from pretrain.model.attention import flash_attn_available

    device = torch.device("cuda")
    backends = ["sdpa", "flex"] + (["flash"] if flash_attn_available() else [])
    # A training shape (head_dim 64, 256 tokens): the compiled kernels choose their tiles for it.
    lengths = GPU_ROWS[rows]
    seq = sum(lengths[0])
    q32, k32, v32 = (t.detach().requires_grad_() for t in qkv(8, 2, seq=seq, device=device, head_dim=64))
    qc, kc, vc = (t.detach().cpu().requires_grad_() for t in (q32, k32, v32))
    expected = reference(qc, kc, vc, lengths)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (qc, kc, vc), grad)
    expected = expected.detach()
    for backend in backends:
        kernel = attention_kernel(backend)
        q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in (q32, k32, v32))
        docs = kernel.documents(positions(lengths), device)
        out = kernel(q, k, v, docs)
        grads = torch.autograd.grad(out, (q, k, v), grad.to(device, torch.bfloat16))
        torch.testing.assert_close(out.float().cpu(), expected, rtol=2e-2, atol=2e-2, msg=backend)
        for name, a, b in zip("qkv", grads, expected_grads):
            torch.testing.assert_close(a.float().cpu(), b, rtol=5e-2, atol=5e-2, msg=f"{backend} d{name}")
