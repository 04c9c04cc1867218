"""Llama, Qwen2.5, Qwen3 and OLMo 2 are this model with switches set (model.qkv_bias, model.qk_norm,
model.norm_placement): a random-init transformers model of each family imports with transformers'
logits at TP=1 and TP=2 (with and without sequence parallelism, fused and unfused q/k/v), its
gradients do not depend on the layout, it trains, and its export loads back in transformers with
our trained logits. Presets carry the published shapes. All fp32; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helpers import TINY, run_distributed

ATOL = 1e-5  # fp32 logits: transformers and our kernels sum in different orders
GRAD_RTOL = 1e-4  # gradients of TP=2 against TP=1: all-reduces change the summation order
TOKENS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
SIZES = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
# family -> (transformers model_type, its config beyond SIZES, the switches the import must set)
FAMILIES = {
    "llama": ("llama", dict(rope_theta=500000.0, tie_word_embeddings=False),
              dict(qkv_bias=False, qk_norm=None, norm_placement="pre")),
    "qwen2": ("qwen2", dict(rope_theta=1e6, tie_word_embeddings=True),
              dict(qkv_bias=True, qk_norm=None, norm_placement="pre")),
    # head_dim 32 != hidden / heads (16), as in Qwen3-0.6B: exercises model.kv_channels
    "qwen3": ("qwen3", dict(rope_theta=1e6, tie_word_embeddings=True, head_dim=32),
              dict(qkv_bias=False, qk_norm="head", norm_placement="pre", kv_channels=32)),
    "olmo2": ("olmo2", dict(rope_theta=500000.0, tie_word_embeddings=False, pad_token_id=None, eos_token_id=None),
              dict(qkv_bias=False, qk_norm="full", norm_placement="post")),
}
# (tp, sequence parallel, fused q/k/v)
LAYOUTS = [(1, False, True), (2, False, True), (2, True, True), (2, False, False)]


def _save_hf(path: Path, model_type: str, extra: dict, seed: int) -> torch.Tensor:
    """A random transformers model of the family saved at path; its logits on TOKENS."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **SIZES, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers starts norms at 1 and biases at 0; make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
        logits = model(TOKENS).logits.float()
    model.save_pretrained(str(path))
    return logits


def _hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[Path, Path, torch.Tensor]]:
    """family -> (its transformers directory, the from-hf checkpoint, transformers' logits)."""
    from pretrain.hf import from_hf

    root = tmp_path_factory.mktemp("families")
    out = {}
    for seed, (family, (model_type, extra, _)) in enumerate(FAMILIES.items()):
        hf_dir = root / f"hf-{family}"
        logits = _save_hf(hf_dir, model_type, extra, seed)
        out[family] = (hf_dir, from_hf(hf_dir, root / f"ckpt-{family}"), logits)
    return out


def test_import_sets_each_familys_switches(imported) -> None:
    from pretrain.checkpoint import read_manifest

    for family, (_, _, switches) in FAMILIES.items():
        model = read_manifest(imported[family][1])["model"]
        assert {k: model[k] for k in switches} == switches, family
        assert model["kv_channels"] == switches.get("kv_channels"), family


def _layouts(models: dict[str, dict], tensors: dict[str, dict[str, torch.Tensor]]) -> dict:
    """In every rank: each family in each LAYOUT, loaded with the same full tensors; rank 0 returns
    full-vocabulary logits on TOKENS and the full gradients of the loss on TOKENS."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.config import ModelConfig
    from pretrain.model import GPT
    from pretrain.parallel.groups import init_distributed
    from pretrain.parallel.sharding import gather, logical_names, merge_full, shard, split_full

    out: dict = {}
    torch.manual_seed(0)
    for tp, sp, fused in LAYOUTS:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        init_distributed(tp, "cpu")
        group = parallel_state.get_tensor_model_parallel_group()
        for family, model_cfg in models.items():
            cfg = ModelConfig(**{**model_cfg, "fused_qkv": fused})
            model = GPT(cfg, sequence_parallel=sp, attention="sdpa")
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(shard(merge_full(p, [tensors[family][n] for n in logical_names(name, p)]), p))
            local = model(TOKENS)
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local.detach().contiguous(), group=group)
            model(TOKENS, labels=TOKENS.roll(-1, dims=1)).backward()  # 24 positions: SP splits them
            grads = {n: g for name, p in model.named_parameters()
                     for n, g in split_full(name, p, gather(p.grad, p))}
            out[(family, tp, sp, fused)] = (torch.cat(parts, dim=-1), grads)
    return out if dist.get_rank() == 0 else {}


def _layouts_then_train(models: dict, tensors: dict, jobs: list[tuple[list[str], str]]) -> tuple[dict, list]:
    """One pair of processes for both: starting them costs more than the checks."""
    return _layouts(models, tensors), _train(jobs)


@pytest.fixture(scope="module")
def distributed(imported, tmp_path_factory) -> tuple[dict, list[torch.Tensor], Path]:
    """Rank 0's results of _layouts and of _train (each family trained 2 steps at TP=2 from its
    import), and the directory of the training runs."""
    from pretrain.checkpoint import read_full_tensors, read_manifest
    from pretrain.checkpoint.offline import model_overrides

    runs = tmp_path_factory.mktemp("family-runs")
    models = {f: read_manifest(ckpt)["model"] for f, (_, ckpt, _) in imported.items()}
    tensors = {f: dict(read_full_tensors(ckpt)) for f, (_, ckpt, _) in imported.items()}
    jobs = []
    for family, (_, ckpt, _) in imported.items():
        overrides = [o for o in TINY if not o.startswith("model.")] + model_overrides(models[family])
        jobs.append(([*overrides, f"checkpoint.init_from={ckpt}", "parallel.tp=2", "parallel.zero_stage=0",
                      "train.max_steps=2", "train.sample_tokens=0"], str(runs / f"run-{family}")))
    layouts, trained = run_distributed(_layouts_then_train, 2, models, tensors, jobs)[0]
    return layouts, trained, runs


def test_families_match_transformers_at_tp1_and_tp2_with_equal_gradients(imported, distributed) -> None:
    got = distributed[0]
    report = []
    for family, (_, _, expected) in imported.items():
        _, reference = got[(family, 1, False, True)]
        for tp, sp, fused in LAYOUTS:
            logits, grads = got[(family, tp, sp, fused)]
            diff = (logits - expected).abs().max().item()
            report.append(f"{family} tp={tp} sp={sp} fused={fused}: {diff:.1e}")
            assert diff < ATOL, report[-1]
            assert grads.keys() == reference.keys()
            for name, g in grads.items():
                scale = reference[name].abs().max().item()
                assert (g - reference[name]).abs().max().item() <= GRAD_RTOL * scale + 1e-8, (family, tp, sp, name)
        # the switches matter: the q/k norms' gains and the biases got gradients
        assert any(n.endswith((".bias", "_norm.weight")) and "layernorm" not in n for n in reference) == (
            family != "llama")
    print("logits max |diff| vs transformers: " + "; ".join(report))


def _train(jobs: list[tuple[list[str], str]]) -> list[torch.Tensor]:
    """In every rank: build each run at TP=2, train it to max_steps (saving at the end), and return
    the full-vocabulary logits on TOKENS."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.config import compose
    from pretrain.train import build

    out = []
    for overrides, run_dir in jobs:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        trainer = build(compose([*overrides, f"run.dir={run_dir}"], world_size=int(os.environ["WORLD_SIZE"])))
        trainer.run()
        with torch.no_grad():
            local = trainer.engine.module.eval()(TOKENS).float()
        parts = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out.append(torch.cat(parts, dim=-1))
    return out


def test_families_train_at_tp2_and_export_back_to_transformers(imported, distributed, tmp_path) -> None:
    from pretrain.hf import to_hf

    _, trained, runs = distributed
    for (family, (model_type, _, _)), ours in zip(FAMILIES.items(), trained):
        assert (ours - imported[family][2]).abs().max().item() > 1e-4, family  # training changed the model
        out = to_hf(runs / f"run-{family}", tmp_path / f"export-{family}", with_tokenizer=False)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == model_type, family
        assert config["architectures"] == [json.loads((imported[family][0] / "config.json").read_text())
                                           ["architectures"][0]], family
        assert (_hf_logits(out, TOKENS) - ours).abs().max().item() < ATOL, family


def test_export_refuses_a_switch_combination_no_architecture_has() -> None:
    from pretrain.hf import ConversionError, architecture

    assert architecture({"qk_norm": "full", "norm_placement": "post"}) == "Olmo2ForCausalLM"
    with pytest.raises(ConversionError, match="no Hugging Face architecture"):
        architecture({"qkv_bias": True, "qk_norm": "head"})


@pytest.mark.parametrize("preset, shape", [
    ("qwen2.5-0.5b", dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, kv_heads=2, head_dim=64,
                          ffn_size=4864, tie_embeddings=True, qkv_bias=True, qk_norm=None, norm_placement="pre",
                          rope_theta=1e6, norm_eps=1e-6)),
    ("qwen2.5-7b", dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, kv_heads=4, head_dim=128,
                        ffn_size=18944, tie_embeddings=False, qkv_bias=True, qk_norm=None, rope_theta=1e6)),
    ("qwen3-0.6b", dict(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, kv_heads=8, head_dim=128,
                        ffn_size=3072, tie_embeddings=True, qkv_bias=False, qk_norm="head", rope_theta=1e6)),
    ("qwen3-8b", dict(vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32, kv_heads=8, head_dim=128,
                      ffn_size=12288, tie_embeddings=False, qk_norm="head", rope_theta=1e6)),
    ("olmo2-1b", dict(vocab_size=100352, hidden_size=2048, num_layers=16, num_heads=16, kv_heads=16, head_dim=128,
                      ffn_size=8192, tie_embeddings=False, qk_norm="full", norm_placement="post", rope_theta=5e5,
                      norm_eps=1e-6)),
    ("olmo2-7b", dict(vocab_size=100352, hidden_size=4096, num_layers=32, num_heads=32, kv_heads=32, head_dim=128,
                      ffn_size=11008, tie_embeddings=False, qk_norm="full", norm_placement="post", rope_theta=5e5)),
])
def test_family_presets_have_the_published_shapes(preset: str, shape: dict) -> None:
    from pretrain.config import compose

    model = compose([f"model={preset}", "parallel.tp=2"]).model  # TP=2 divides every sharded size
    for key, value in shape.items():
        assert getattr(model, key) == value, key
