"""Tensor and sequence parallelism compute the TP=1 model, and train it on the TP=1 loss curve.

One two-rank launch builds the TP=1 model and then every TP=2 variant (with and without sequence
parallelism, each activation-checkpointing mode, tied and untied embeddings) on the same packed
GQA batch, and reports how far the gathered weights, logits and gradients are from TP=1. Separate
launches train each supported TP x DP x ZeRO layout against the single-process loss curve.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from helpers import TINY, losses, run_distributed, train

# Two documents in row 0, three in row 1: position_ids restart where a document starts.
DOCUMENTS = [[10, 22], [5, 15, 12]]
SEQ = 32
CKPT_MODES = ("none", "full", "selective")


# ---------------------------------------------------------------------------------------------
# Forward and backward of one batch: TP=2 (with and without SP) against TP=1
# ---------------------------------------------------------------------------------------------

def _packed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, vocab, (len(DOCUMENTS), SEQ), generator=g)
    labels = torch.randint(0, vocab, (len(DOCUMENTS), SEQ), generator=g)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCUMENTS])
    return input_ids, labels, position_ids


def _model_config(tie: bool, ckpt: str):
    from pretrain.config import compose

    cfg = compose(TINY).model
    assert cfg.kv_heads < cfg.num_heads and cfg.kv_heads % 2 == 0  # GQA that splits over tp=2
    return dataclasses.replace(cfg, tie_embeddings=tie, activation_checkpointing=ckpt)


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """[b, s, v/tp] on each TP rank -> [b, s, v]."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _forward_backward(tie: bool, sp: bool, ckpt: str) -> dict:
    """Full (TP=1-shaped) weights, logits, loss and gradients of one model in the current layout."""
    from pretrain.model import GPT, init_weights
    from pretrain.parallel.sharding import gather

    cfg = _model_config(tie, ckpt)
    model = GPT(cfg, sequence_parallel=sp, attention="sdpa")
    init_weights(model, seed=1234, init_std=cfg.init_std, num_layers=cfg.num_layers)
    input_ids, labels, position_ids = _packed_batch(cfg.vocab_size)
    with torch.no_grad():
        logits = _gather_vocab(model(input_ids, position_ids=position_ids))
    loss = model(input_ids, labels, position_ids)
    loss.backward()
    return {
        "weights": {n: gather(p.detach(), p) for n, p in model.named_parameters()},
        "grads": {n: gather(p.grad, p) for n, p in model.named_parameters()},
        "logits": logits, "loss": loss.detach(),
    }


def _max_diff(a: dict, b: dict) -> dict:
    """Largest absolute difference of logits, loss and each gradient; exact equality of weights."""
    return {
        "weights_equal": all(torch.equal(a["weights"][n], b["weights"][n]) for n in b["weights"]),
        "same_names": sorted(a["grads"]) == sorted(b["grads"]),
        "logits": float((a["logits"] - b["logits"]).abs().max()),
        "loss": float((a["loss"] - b["loss"]).abs()),
        "grads": {n: float((a["grads"][n] - b["grads"][n]).abs().max()) for n in b["grads"]},
        "grad_scale": max(float(g.abs().max()) for g in b["grads"].values()),
    }


def _tp_equivalence() -> dict:
    """On 2 ranks: the TP=1 model first (replicated on both), then the same grid rebuilt as TP=2."""
    from megatron.core import parallel_state

    from pretrain.parallel.groups import init_distributed

    torch.manual_seed(0)
    init_distributed(tp=1, device_kind="cpu")
    reference = {tie: _forward_backward(tie, sp=False, ckpt="none") for tie in (False, True)}
    parallel_state.destroy_model_parallel()
    init_distributed(tp=2, device_kind="cpu")
    report = {}
    for tie in (False, True):
        for sp in (False, True):
            tp_none = None
            for ckpt in CKPT_MODES:
                got = _forward_backward(tie, sp, ckpt)
                report[(tie, sp, ckpt)] = _max_diff(got, reference[tie])
                if ckpt == "none":
                    tp_none = got
                else:  # recomputation changes nothing within the same layout
                    report[(tie, sp, ckpt, "vs_none")] = _max_diff(got, tp_none)
    return report


@pytest.fixture(scope="module")
def tp_report() -> dict:
    return run_distributed(_tp_equivalence, 2)[0]


LAYOUTS = [(tie, sp, ckpt) for tie in (False, True) for sp in (False, True) for ckpt in CKPT_MODES]


def _layout_id(layout) -> str:
    tie, sp, ckpt = layout
    return f"{'tied' if tie else 'untied'}-tp2{'-sp' if sp else ''}-ckpt_{ckpt}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_tp2_logits_and_grads_match_tp1(layout, tp_report) -> None:
    """Packed documents, GQA: gathered logits (full vocab) and per-parameter gradients equal TP=1."""
    r = tp_report[layout]
    assert r["same_names"]
    assert r["logits"] < 1e-5, f"logits differ by {r['logits']}"
    assert r["loss"] < 1e-6, f"loss differs by {r['loss']}"
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < 1e-5 * r["grad_scale"], f"{worst}: gradient differs by {r['grads'][worst]}"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_same_seed_gives_same_full_weights_for_tp1_and_tp2(tie: bool, sp: bool, tp_report) -> None:
    assert tp_report[(tie, sp, "none")]["weights_equal"]


@pytest.mark.parametrize("ckpt", ["full", "selective"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_activation_checkpointing_gives_the_same_grads_under_tp(ckpt: str, sp: bool, tp_report) -> None:
    r = tp_report[(False, sp, ckpt, "vs_none")]
    assert r["loss"] == 0.0
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < 1e-6, f"{worst}: gradient differs by {r['grads'][worst]} from ckpt=none"


# ---------------------------------------------------------------------------------------------
# Training: TP x DP x ZeRO layouts follow the TP=1, DP=1 loss and grad-norm curves
# ---------------------------------------------------------------------------------------------

STEPS = 10
# A learning rate high enough that the curve moves; gradients stay above grad_clip=1, so the clipping
# norm scales every update. The norm gains' gradients are small here: counting the TP-replicated
# gains on both TP ranks moves the norm by ~1e-4 relative and the loss by less than float noise,
# which is why grad_norm is compared on its own, to 1e-5 (the layouts agree to ~2e-7).
TRAIN = TINY + [f"train.max_steps={STEPS}", "optim.lr=3e-3"]

# name: (world size, overrides, synthetic). Every layout sees the same global batch of 4 sequences:
# DP=2 layouts take their own DP rank's 2; DP=1 layouts concatenate DP ranks 0 and 1 like the reference.
TRAIN_LAYOUTS = {
    # ZeRO-0 logs pretrain.parallel.engine.grad_norm; ZeRO 1-3 log the norm DeepSpeed clipped with.
    "tp2-zero0": (2, ["parallel.tp=2", "parallel.zero_stage=0", "train.micro_batch_size=4"], [0, 1]),
    "tp2-dp2-zero1": (4, ["parallel.tp=2", "parallel.zero_stage=1"], True),
    "tp2-zero2": (2, ["parallel.tp=2", "parallel.zero_stage=2", "train.micro_batch_size=4"], [0, 1]),
    "tp2-sp-zero1": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1",
                         "train.micro_batch_size=4"], [0, 1]),
    "tp2-sp-dp2-zero3": (4, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=3"], True),
}


def _train_curve(overrides: list[str], synthetic, run_dir: str) -> dict:
    records, _ = train(TRAIN + overrides, run_dir, synthetic=synthetic)
    return {"loss": losses(records), "grad_norm": [r["grad_norm"] for r in records]}


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory) -> dict:
    run_dir = str(tmp_path_factory.mktemp("tp1-reference"))
    return run_distributed(_train_curve, 1, ["parallel.zero_stage=0", "train.micro_batch_size=4"], [0, 1],
                           run_dir)[0]


@pytest.mark.parametrize("layout", list(TRAIN_LAYOUTS))
def test_layout_trains_on_the_tp1_curve(layout: str, reference_curve: dict, tmp_path) -> None:
    world, overrides, synthetic = TRAIN_LAYOUTS[layout]
    curves = run_distributed(_train_curve, world, overrides, synthetic, str(tmp_path))
    got, want = curves[0], reference_curve
    assert all(c == got for c in curves)  # logged values are global: identical on every rank
    assert len(got["loss"]) == STEPS
    assert want["loss"][-1] < want["loss"][0]  # it trains
    assert min(want["grad_norm"]) > 1.0  # clipping is active in every step
    loss_diff = max(abs(a - b) for a, b in zip(got["loss"], want["loss"]))
    norm_diff = max(abs(a - b) / b for a, b in zip(got["grad_norm"], want["grad_norm"]))
    print(f"{layout}: max |loss - reference| = {loss_diff:.2e}, max relative grad_norm diff = {norm_diff:.2e}")
    assert loss_diff < 1e-4, f"{layout}: loss {got['loss']} vs reference {want['loss']}"
    assert norm_diff < 1e-5, f"{layout}: grad_norm {got['grad_norm']} vs reference {want['grad_norm']}"


def test_bf16_autocast_under_tp_trains_on_the_tp1_curve(tmp_path) -> None:
    """bf16 at ZeRO-0 is autocast over fp32 weights (pretrain.precision). Under TP its 16-bit
    operands go through megatron's column-parallel Function and, with SP, through the sequence
    gathers and reduce-scatters. bf16 sums the ranks' partial products in another order than one
    rank does, so the curves agree to bf16 rounding (measured 6e-4), not to fp32's 1e-4."""
    bf16 = ["train.precision=bf16", "parallel.zero_stage=0", "train.micro_batch_size=4"]
    want = run_distributed(_train_curve, 1, bf16, [0, 1], str(tmp_path / "tp1"))[0]
    assert want["loss"][-1] < want["loss"][0]
    for name, tp in {"tp2": ["parallel.tp=2"],
                     "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]}.items():
        curves = run_distributed(_train_curve, 2, [*bf16, *tp], [0, 1], str(tmp_path / name))
        assert curves[0] == curves[1]
        loss_diff = max(abs(a - b) for a, b in zip(curves[0]["loss"], want["loss"]))
        print(f"bf16 {name}: max |loss - tp1| = {loss_diff:.2e}")
        assert loss_diff < 2e-2, f"bf16 {name}: loss {curves[0]['loss']} vs tp1 {want['loss']}"


# ---------------------------------------------------------------------------------------------
# Configuration: layouts that cannot be split fail before any worker starts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, world_size, key", [
    (["parallel.tp=2", "model.num_heads=6", "model.hidden_size=96", "model.num_kv_heads=3"], 2, "model.num_kv_heads"),
    (["parallel.tp=4", "model.num_heads=6", "model.hidden_size=96", "model.num_kv_heads=2"], 4, "model.num_heads"),
    (["parallel.tp=4", "model.num_heads=4", "model.num_kv_heads=2"], 4, "model.num_kv_heads"),
    (["parallel.tp=2", "model.vocab_size=1023"], 2, "model.vocab_size"),
    (["parallel.tp=2", "model.ffn_hidden_size=129"], 2, "model.ffn_hidden_size"),
    (["parallel.tp=2"], 3, "parallel.tp"),
    (["parallel.tp=2"], 1, "parallel.tp"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=33"], 2, "train.seq_len"),
])
def test_unsplittable_layout_is_a_config_error(overrides: list[str], world_size: int, key: str) -> None:
    from pretrain.config import ConfigError, compose

    with pytest.raises(ConfigError) as err:
        compose(overrides, world_size=world_size)
    message = str(err.value)
    assert "\n" not in message and key in message, message


def test_sequence_parallel_seq_len_divisible_by_tp_is_accepted() -> None:
    from pretrain.config import compose

    cfg = compose(["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=34"], world_size=4)
    assert cfg.parallel.tp == 2


# ---------------------------------------------------------------------------------------------
# GPU: our device-agnostic sequence-parallel collectives equal megatron-core's on CUDA
# ---------------------------------------------------------------------------------------------

def _compare_sequence_collectives() -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    from pretrain.parallel import sequence
    from pretrain.parallel.groups import init_distributed

    world = int(os.environ["WORLD_SIZE"])
    dims = init_distributed(tp=world, device_kind="cuda")
    group = parallel_state.get_tensor_model_parallel_group()
    g = torch.Generator(device=dims.device).manual_seed(100 + dims.rank)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dims.device)

    cases = {  # name: (ours, megatron's, input shape)
        "gather": (sequence.gather_from_sequence_parallel,
                   lambda x, grp: mappings.gather_from_sequence_parallel_region(x, True, grp), (8, 3, 16)),
        "reduce_scatter": (sequence.reduce_scatter_to_sequence_parallel,
                           mappings.reduce_scatter_to_sequence_parallel_region, (8 * world, 3, 16)),
        "scatter": (sequence.scatter_to_sequence_parallel,
                    mappings.scatter_to_sequence_parallel_region, (8 * world, 3, 16)),
    }
    report = {}
    for name, (ours, theirs, shape) in cases.items():
        x = randn(*shape)
        if name == "scatter":  # its input is replicated across the TP group
            torch.distributed.broadcast(x, src=parallel_state.get_tensor_model_parallel_src_rank(), group=group)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = ours(a, group), theirs(b, group)
        grad_out = randn(*out_a.shape)
        out_a.backward(grad_out)
        out_b.backward(grad_out)
        report[name] = {"forward": float((out_a - out_b).abs().max()),
                        "backward": float((a.grad - b.grad).abs().max()),
                        "shapes": (tuple(out_a.shape), tuple(out_b.shape)),
                        "device": str(out_a.device)}
    return report


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_sequence_collectives_equal_megatron_core_on_cuda(world: int) -> None:
    """World 1 is megatron's identity short-cut (still proves device placement); world 2 is NCCL."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs for a {world}-rank NCCL group, found {torch.cuda.device_count()}")
    for rank_report in run_distributed(_compare_sequence_collectives, world):
        for name, r in rank_report.items():
            assert r["shapes"][0] == r["shapes"][1], f"{name}: shapes {r['shapes']}"
            assert r["device"].startswith("cuda"), f"{name}: output on {r['device']}"
            assert r["forward"] == 0.0 and r["backward"] == 0.0, f"{name}: {r}"
