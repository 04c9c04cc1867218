"""Model presets of known families, and Llama 3 RoPE scaling: a transformers LlamaForCausalLM with
llama3 scaling imports with the same logits at TP=1 and TP=2, trains, and exports back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helpers import TINY, run_distributed
from test_hf import ATOL, TOKENS, _convert, _hf_logits, _save_llama
from pretrain.config import compose

LLAMA3 = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32})


@pytest.mark.parametrize("preset, shape", [
    ("llama3.2-1b", dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, kv_heads=8, ffn_size=8192,
                         tie_embeddings=True, rope_factor=32.0)),
    ("llama3.2-3b", dict(vocab_size=128256, hidden_size=3072, num_layers=28, num_heads=24, kv_heads=8, ffn_size=8192,
                         tie_embeddings=True, rope_factor=32.0)),
    ("llama3.1-8b", dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, kv_heads=8,
                         ffn_size=14336, tie_embeddings=False, rope_factor=8.0)),
])
def test_llama3_presets_have_the_published_shapes(preset: str, shape: dict) -> None:
    model = compose([f"model={preset}", "parallel.tp=8"]).model  # TP=8 divides every sharded size
    for key, value in shape.items():
        assert getattr(model, key) == value, key
    assert (model.rope_scaling, model.rope_theta, model.rope_original_max_seq_len) == ("llama3", 500000.0, 8192)


def _logits(overrides: list[str], run_dir: str, tokens: torch.Tensor, steps: int) -> torch.Tensor:
    """Build a run (TP from overrides), train `steps` steps, return full-vocabulary logits on tokens."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain.train import build

    trainer = build(compose([*overrides, f"run.dir={run_dir}", f"train.max_steps={max(1, steps)}"],
                            world_size=int(os.environ["WORLD_SIZE"])))
    if steps:
        trainer.run()
    with torch.no_grad():
        local = trainer.engine.module.eval()(tokens).float()
    parts = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def test_llama3_rope_scaling_imports_trains_and_exports(tmp_path: Path) -> None:
    from pretrain.checkpoint import read_manifest
    from pretrain.checkpoint.offline import model_overrides

    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    _save_llama(hf_dir, seed=3, **LLAMA3)
    assert _convert("from-hf", hf_dir, ckpt).returncode == 0
    model = read_manifest(ckpt)["model"]
    assert (model["rope_scaling"], model["rope_factor"], model["rope_original_max_seq_len"]) == ("llama3", 8.0, 32)
    base = [o for o in TINY if not o.startswith("model.")] + model_overrides(model) + [
        f"checkpoint.init_from={ckpt}", "parallel.zero_stage=0", "checkpoint.interval=0"]
    expected = _hf_logits(hf_dir, TOKENS)
    # The scaling matters: plain RoPE gives other logits.
    plain = run_distributed(_logits, 1, base + ["model.rope_scaling=null"], str(tmp_path / "plain"), TOKENS, 0)[0]
    assert (plain - expected).abs().max().item() > 1e-3
    diffs = {}
    for tp in (1, 2):
        got = run_distributed(_logits, tp, base + [f"parallel.tp={tp}"], str(tmp_path / f"tp{tp}"), TOKENS, 0)[0]
        diffs[tp] = (got - expected).abs().max().item()
    assert max(diffs.values()) < ATOL, diffs

    trained = run_distributed(_logits, 2, base + ["parallel.tp=2"], str(tmp_path / "trained"), TOKENS, 3)[0]
    assert (trained - expected).abs().max().item() > 1e-4  # training changed the model
    out = tmp_path / "export"
    assert _convert("to-hf", tmp_path / "trained", out).returncode == 0
    config = json.loads((out / "config.json").read_text())
    assert (config.get("rope_parameters") or config.get("rope_scaling"))["rope_type"] == "llama3"
    assert (_hf_logits(out, TOKENS) - trained).abs().max().item() < ATOL
    print(f"llama3 logits max |diff| vs transformers: TP=1 {diffs[1]:.2e}, TP=2 {diffs[2]:.2e}")
