"""The model alone, in one process: document masking, RoPE per document, GQA, fused projections,
parameter count, tied embeddings, activation checkpointing and compiled blocks. The attention
kernels themselves are tested in test_attention.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import TINY, storage_bytes


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """megatron-core's layers need a (TP=1) process group; this one lives only for this module."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    parallel_state.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


def model_config(*overrides: str, **changes):
    from pretrain.config import compose

    return dataclasses.replace(compose([*TINY, *overrides]).model, **changes)


def build(cfg, seed: int = 1234):
    from pretrain.model import GPT, init_weights

    model = GPT(cfg, attention="sdpa")
    init_weights(model, seed, cfg.init_std, cfg.num_layers)
    return model


def packed(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


# --- documents packed in one row ------------------------------------------------------------

def test_tokens_of_one_document_do_not_change_logits_of_the_next() -> None:
    model = build(model_config())
    positions = packed([12, 20])
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, :12] = (changed[0, :12] + 17) % 1024
    with torch.no_grad():
        before, after = model(ids, position_ids=positions), model(changed, position_ids=positions)
    assert not torch.allclose(before[0, :12], after[0, :12])  # document 1 itself did change
    torch.testing.assert_close(before[0, 12:], after[0, 12:], rtol=0, atol=1e-6)


def test_packed_document_gives_the_logits_it_has_alone() -> None:
    """Masking plus positions that restart at 0: a document's logits do not depend on what precedes it."""
    model = build(model_config())
    ids = torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        in_pack = model(ids, position_ids=packed([12, 20]))[0, 12:]
        alone = model(ids[:, 12:])[0]
    torch.testing.assert_close(in_pack, alone, rtol=0, atol=1e-5)


def test_rope_positions_restart_per_document() -> None:
    from pretrain.model.gpt import RotaryEmbedding, apply_rotary

    rope = RotaryEmbedding(head_dim=16, theta=10000.0)
    cos, sin = rope(packed([5, 7]))  # [s, b, 1, d]
    fresh_cos, fresh_sin = rope(torch.arange(7)[None])
    assert torch.equal(cos[5:], fresh_cos) and torch.equal(sin[5:], fresh_sin)
    x = torch.randn(12, 1, 2, 16)
    rotated = apply_rotary(x, cos, sin)
    assert torch.equal(rotated[5], x[5])  # position 0 (a document start) is not rotated
    assert not torch.allclose(rotated[6], x[6])


# --- hand-written RoPE and RMSNorm (pretrain/model/eager_ops.py) -----------------------------

def _value_and_grads(fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return [out.detach()] + [t.grad for t in inputs if t.requires_grad]


def test_rotation_and_its_backward_equal_the_rotate_half_expression() -> None:
    """Against autograd through Hugging Face's expression, x * cos + rotate_half(x) * sin, on the
    non-contiguous q slice of a fused projection; fp32 rounding differs by an ulp or so."""
    from pretrain.model.gpt import RotaryEmbedding, apply_rotary

    cos, sin = RotaryEmbedding(head_dim=16, theta=10000.0)(packed([5, 7]))
    projection = torch.randn(12, 1, 3 * 2 * 16, generator=torch.Generator().manual_seed(0))
    q = projection[..., : 2 * 16].view(12, 1, 2, 16)
    assert not q.is_contiguous()

    def reference(x: torch.Tensor) -> torch.Tensor:
        full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        return x * full_cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * full_sin

    for got, want in zip(_value_and_grads(lambda x: apply_rotary(x, cos, sin), q.requires_grad_()),
                         _value_and_grads(reference, q)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_rms_norm_and_its_backward_equal_torch_rms_norm() -> None:
    from pretrain.model.eager_ops import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 64, generator=g)
    weight = torch.rand(64, generator=g) + 0.5
    results = []
    for norm in (RMSNorm(64, eps=1e-5), torch.nn.RMSNorm(64, eps=1e-5)):
        with torch.no_grad():
            norm.weight.copy_(weight)
        results.append(_value_and_grads(norm, x.requires_grad_()) + [norm.weight.grad])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- grouped-query attention ----------------------------------------------------------------

def test_gqa_projection_shapes() -> None:
    cfg = model_config("model.num_heads=4", "model.num_kv_heads=2", "model.fused_qkv=false")
    attn = build(cfg).layers[0].self_attn
    head_dim = cfg.hidden_size // 4
    assert attn.q_proj.weight.shape == (4 * head_dim, cfg.hidden_size)
    assert attn.k_proj.weight.shape == (2 * head_dim, cfg.hidden_size)
    assert attn.v_proj.weight.shape == (2 * head_dim, cfg.hidden_size)
    assert attn.o_proj.weight.shape == (cfg.hidden_size, 4 * head_dim)
    assert build(cfg)(torch.zeros(2, 32, dtype=torch.long)).shape == (2, 32, cfg.vocab_size)
    fused = build(model_config("model.num_heads=4", "model.num_kv_heads=2")).layers[0].self_attn
    assert fused.qkv_proj.weight.shape == ((4 + 2 + 2) * head_dim, cfg.hidden_size)


# --- fused projections ----------------------------------------------------------------------

def _split_grads(model) -> dict[str, torch.Tensor]:
    """Gradients under checkpoint names: a fused weight's gradient split into its parts."""
    from pretrain.parallel.sharding import split_full

    return {n: g for name, p in model.named_parameters() for n, g in split_full(name, p, p.grad)}


def test_fused_projections_compute_the_unfused_model() -> None:
    """Same seed: the fused model's q/k/v and gate/up parts are the unfused weights, so the loss and
    every gradient (split into its parts) agree within fp32 matmul noise (one matmul against three
    sums in another order)."""
    g = torch.Generator().manual_seed(6)
    ids, labels = (torch.randint(0, 1024, (2, 32), generator=g) for _ in range(2))
    runs = {}
    for fused in (True, False):
        model = build(model_config(f"model.fused_qkv={fused}", f"model.fused_mlp={fused}"))
        loss = model(ids, labels, packed([10, 22]).expand(2, -1))
        loss.backward()
        runs[fused] = loss.detach(), _split_grads(model)
    assert "layers.0.self_attn.qkv_proj.weight" in dict(build(model_config()).named_parameters())
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=0, atol=1e-6)
    assert sorted(runs[True][1]) == sorted(runs[False][1])
    for name, grad in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --- size and weight tying ------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    [], ["model.tie_embeddings=true"], ["model.num_kv_heads=1", "model.ffn_hidden_size=100"],
    ["model=125m", "model.num_layers=2"],  # the 125m shape (tied, MHA), fewer layers to build quickly
    ["model.qkv_bias=true"], ["model.qk_norm=head"], ["model.qk_norm=full", "model.norm_placement=post"],
], ids=["tiny", "tied", "mqa-custom-ffn", "125m-shape", "qkv-bias", "qk-norm-head", "qk-norm-full-post"])
def test_parameter_count_matches_the_planner(overrides: list[str]) -> None:
    from launch.plan import parameter_count
    from pretrain.model import GPT, count_parameters

    cfg = model_config(*overrides)
    model = GPT(cfg, attention="sdpa")
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) == parameter_count(cfg)


def test_tied_embeddings_share_one_matrix_for_input_and_output() -> None:
    """Tied: no lm_head weight; logits and gradients equal an untied model whose head is a copy of
    the embedding, with the embedding's gradient the sum of both uses."""
    tied = build(model_config("model.tie_embeddings=true"))
    untied = build(model_config())
    with torch.no_grad():
        for name, p in tied.named_parameters():
            dict(untied.named_parameters())[name].copy_(p)
        untied.lm_head.weight.copy_(tied.embed_tokens.weight)
    assert tied.lm_head.weight is None and not any("lm_head" in n for n, _ in tied.named_parameters())
    g = torch.Generator().manual_seed(4)
    ids, labels = (torch.randint(0, 1024, (2, 32), generator=g) for _ in range(2))
    tied(ids, labels).backward()
    untied(ids, labels).backward()
    torch.testing.assert_close(tied.embed_tokens.weight.grad,
                               untied.embed_tokens.weight.grad + untied.lm_head.weight.grad)
    for name, p in tied.named_parameters():
        if name != "embed_tokens.weight":
            torch.testing.assert_close(p.grad, dict(untied.named_parameters())[name].grad)


# --- activation checkpointing ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_grads(mode: str) -> None:
    def grads(checkpointing: str) -> dict[str, torch.Tensor]:
        model = build(model_config(f"model.activation_checkpointing={checkpointing}"))
        g = torch.Generator().manual_seed(5)
        ids, labels = (torch.randint(0, 1024, (2, 32), generator=g) for _ in range(2))
        model(ids, labels, packed([10, 22]).expand(2, -1)).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    reference, recomputed = grads("none"), grads(mode)
    for name, grad in reference.items():
        assert torch.equal(recomputed[name], grad), name


# --- compiled blocks ------------------------------------------------------------------------

def test_compiled_blocks_train_like_eager_blocks() -> None:
    """model.compile: three SGD steps of the TINY model with every block compiled by inductor give
    the eager losses, within fp32 tolerance (inductor fuses and reorders float arithmetic)."""
    from pretrain.model import GPT, init_weights

    def losses(compiled: bool) -> list[float]:
        torch._dynamo.reset()
        cfg = model_config()
        model = GPT(cfg, attention="sdpa", compile_blocks=compiled)
        init_weights(model, 1234, cfg.init_std, cfg.num_layers)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(8)
        ids, labels = (torch.randint(0, 1024, (2, 32), generator=g) for _ in range(2))
        out = []
        for _ in range(3):
            loss = model(ids, labels, packed([10, 22]).expand(2, -1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out.append(loss.item())
        return out

    eager, compiled = losses(False), losses(True)
    assert eager[2] < eager[0] - 0.01  # the steps do train, so equal curves mean equal updates
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# --- autocast (bf16 over fp32 weights) -------------------------------------------------------

def _autocast_step(cfg, autocast: torch.dtype | None, compiled: bool = False):
    """Loss and gradients of one forward/backward of the TINY-shaped model, same seed and batch."""
    from pretrain.model import GPT, init_weights

    torch._dynamo.reset()
    model = GPT(cfg, attention="sdpa", compile_blocks=compiled, autocast=autocast)
    init_weights(model, 1234, cfg.init_std, cfg.num_layers)
    g = torch.Generator().manual_seed(8)
    ids, labels = (torch.randint(0, 1024, (2, 32), generator=g) for _ in range(2))
    loss = model(ids, labels, packed([10, 22]).expand(2, -1))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model


@pytest.mark.parametrize("family", [(), ("model.qk_norm=head", "model.qkv_bias=true")])
def test_autocast_runs_matmuls_in_bf16_and_keeps_weights_and_gradients_fp32(family: tuple[str, ...]) -> None:
    """GPT(autocast=bf16), what bf16 at ZeRO-0 trains (pretrain.precision): logits come out of
    bf16 matmuls, every weight and gradient stays fp32, and loss and gradients are the fp32
    model's within bf16 rounding (8 mantissa bits: ~1e-2 relative, not 1e-6)."""
    cfg = model_config(*family)
    loss32, grads32, _ = _autocast_step(cfg, None)
    loss16, grads16, model = _autocast_step(cfg, torch.bfloat16)
    assert loss16 != loss32 and abs(loss16 - loss32) < 1e-2 * loss32
    for name, grad in grads16.items():
        assert grad.dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), grads32[name].flatten(), dim=0)
        assert cosine > 0.99, f"{name}: gradient direction {cosine:.4f} off the fp32 model's"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        assert model(torch.zeros(1, 8, dtype=torch.long)).dtype == torch.bfloat16


def test_rms_norm_under_autocast_keeps_fp32_statistics() -> None:
    """Autocast runs dot products (linalg.vecdot) in bf16, so the eager norm's statistics would lose
    precision inside it; under autocast the norm computes in fp32 (and in the input's dtype out)."""
    from pretrain.model.eager_ops import RMSNorm

    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(0)) * 3
    want = norm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got32, got16 = norm(x), norm(x.bfloat16())
    assert got32.dtype == torch.float32 and got16.dtype == torch.bfloat16
    torch.testing.assert_close(got32, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got16.float(), norm(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_compiled_blocks_under_autocast_match_eager_autocast() -> None:
    """model.compile with bf16 at ZeRO-0: inductor fuses the same bf16 arithmetic differently, so
    the loss and gradients agree within bf16 rounding, not bit for bit."""
    cfg = model_config()
    eager_loss, eager_grads, _ = _autocast_step(cfg, torch.bfloat16)
    loss, grads, _ = _autocast_step(cfg, torch.bfloat16, compiled=True)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-2, atol=1e-2)
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), eager_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name


def test_a_callers_autocast_reaches_a_model_without_its_own() -> None:
    """GPT(autocast=None) enters no autocast context, so a caller's own (tools/benchmark.py's
    reference loop) stays in force rather than being switched off."""
    model = build(model_config())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.zeros(1, 8, dtype=torch.long)).dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.zeros(1, 8, dtype=torch.long)).dtype == torch.float32


# --- the compiled loss -----------------------------------------------------------------------

def saved_bytes_per_logit(loss_fn, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Bytes the loss keeps for its backward (autograd's saved tensors), per logit."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(logits, labels)
    return sum(storage_bytes(saved).values()) / logits.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_loss_computes_the_eager_loss_and_keeps_the_logits_own_dtype(dtype: torch.dtype) -> None:
    """model.compile's loss (compiled_whole_vocab_loss) gives the eager loss and logits gradient
    within fp32 rounding (inductor sums the log-sum-exp in another order), from fp32 and bf16
    logits alike. For its backward it keeps the logits themselves, in their own dtype; eager keeps an
    fp32 log-softmax, twice the bytes of bf16 logits (the memory plan's logits term)."""
    from pretrain.parallel.layers import compiled_whole_vocab_loss, whole_vocab_loss

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 3, 1000, generator=g) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (16, 3), generator=g)
    results = {}
    for name, loss_fn in (("eager", whole_vocab_loss), ("compiled", compiled_whole_vocab_loss())):
        loss = loss_fn(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits)
        results[name] = (loss, grad, saved_bytes_per_logit(loss_fn, logits, labels))
    (loss, grad, kept), (eager_loss, eager_grad, eager_kept) = results["compiled"], results["eager"]
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)
    # per row of 1,000 logits, the label (and the compiled loss's log-sum-exp) add 0.02 bytes a logit
    assert eager_kept == pytest.approx(4, abs=0.05)  # the fp32 log-softmax
    assert kept == pytest.approx(logits.element_size(), abs=0.05)  # the logits themselves


def test_a_model_with_compiled_blocks_compiles_its_loss_too() -> None:
    """The loss is a compiled graph of its own, beside the blocks', and only with labels (logits
    for generation and scoring are returned before it)."""
    from torch._dynamo.utils import counters

    from pretrain.model import GPT

    model = build(model_config())
    torch._dynamo.reset()
    compiled = GPT(model_config(), attention="sdpa", compile_blocks=True)
    compiled.load_state_dict(model.state_dict())
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
    counters.clear()
    with torch.no_grad():
        compiled(ids)
    graphs_without_loss = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        got, want = compiled(ids, ids), model(ids, ids)
    assert counters["stats"]["unique_graphs"] == graphs_without_loss + 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
