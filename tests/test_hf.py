"""Hugging Face export and import give the same function: logits equal transformers' Llama.

Export: a trained checkpoint → to-hf → LlamaForCausalLM.from_pretrained gives our model's logits,
and AutoTokenizer.from_pretrained tokenizes like our tokenizer. Import: transformers-initialised
Llamas (GQA untied, MHA tied), saved locally → from-hf → a run started with
checkpoint.init_from gives transformers' logits. All fp32; nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import HUNG, TINY, run_distributed

ROOT = Path(__file__).resolve().parent.parent
TOOL = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
ATOL = 1e-5
TOKENS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits_of_runs(jobs: list[tuple[list[str], str]], tokens: torch.Tensor, train: bool = True) -> list[torch.Tensor]:
    """Build each run in this process (loading checkpoint.init_from if set), train it to max_steps
    when `train`, and return our logits on `tokens`."""
    from megatron.core import parallel_state

    from pretrain.config import compose
    from pretrain.train import build

    out = []
    for overrides, run_dir in jobs:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        trainer = build(compose([*overrides, f"run.dir={run_dir}"], world_size=1))
        if train and trainer.cfg.train.max_steps > trainer.step:
            trainer.run()
        model = trainer.engine.module.eval()
        with torch.no_grad():
            out.append(model(tokens).float())
    return out


def _hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *map(str, args)], capture_output=True, text=True, timeout=HUNG)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A tiny GQA model trained 3 steps on the embedded corpus; its run dir and logits."""
    run_dir = tmp_path_factory.mktemp("hf-run")
    overrides = TINY + ["train.max_steps=3", "parallel.zero_stage=0"]
    [logits] = run_distributed(_logits_of_runs, 1, [(overrides, str(run_dir))], TOKENS)[0]
    return run_dir, logits


def test_export_matches_transformers_llama(trained, tmp_path) -> None:
    run_dir, ours = trained
    out = tmp_path / "hf"
    result = _convert("to-hf", run_dir, out)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (1024, 64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 192)
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-5
    theirs = _hf_logits(out, TOKENS)
    assert theirs.shape == ours.shape == (2, 24, 1024)
    assert (theirs - ours).abs().max().item() < ATOL


def test_export_tokenizer_loads_with_autotokenizer(trained, tmp_path) -> None:
    from transformers import AutoTokenizer

    from pretrain.checkpoint import read_manifest, resolve
    from pretrain.data import load_tokenizer

    run_dir, _ = trained
    out = tmp_path / "hf"
    assert _convert("to-hf", run_dir, out).returncode == 0
    ours = load_tokenizer(resolve(run_dir) / read_manifest(resolve(run_dir))["tokenizer"]["file"])
    theirs = AutoTokenizer.from_pretrained(str(out))
    text = "def main():\n    return 'héllo wörld'  # <|endoftext|>"
    assert theirs(text)["input_ids"] == ours.encode(text).ids
    assert theirs.decode(theirs(text)["input_ids"]) == text
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == 0


def test_export_refuses_non_empty_output(trained, tmp_path) -> None:
    run_dir, _ = trained
    (tmp_path / "keep.txt").write_text("mine")
    result = _convert("to-hf", run_dir, tmp_path)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def _save_llama(path: Path, seed: int, **sizes) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1024, max_position_embeddings=256, rms_norm_eps=1e-6, **sizes)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # transformers initialises norms to 1; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))


IMPORTS = {
    "gqa-untied": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False),
    "mha-tied": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
                     num_key_value_heads=6, rope_theta=10000.0, tie_word_embeddings=True),
}


def test_import_matches_transformers_llama(tmp_path) -> None:
    from pretrain.checkpoint import read_manifest
    from pretrain.checkpoint.offline import model_overrides

    jobs, expected = [], []
    for i, (name, sizes) in enumerate(IMPORTS.items()):
        hf_dir, ckpt = tmp_path / f"hf-{name}", tmp_path / f"ckpt-{name}"
        _save_llama(hf_dir, seed=i, **sizes)
        result = _convert("from-hf", hf_dir, ckpt)
        assert result.returncode == 0, result.stderr
        assert "checkpoint.init_from=" in result.stdout
        manifest = read_manifest(ckpt)
        assert manifest["step"] == 0 and manifest["data"] is None
        assert all("optim_file" not in info for info in manifest["tensors"].values())
        overrides = [o for o in TINY if not o.startswith("model.")] + model_overrides(manifest["model"])
        jobs.append(([*overrides, "train.max_steps=1", f"checkpoint.init_from={ckpt}", "parallel.zero_stage=0"],
                     str(tmp_path / f"run-{name}")))
        expected.append(_hf_logits(hf_dir, TOKENS))
    ours = run_distributed(_logits_of_runs, 1, jobs, TOKENS, False)[0]
    for name, got, want in zip(IMPORTS, ours, expected):
        assert (got - want).abs().max().item() < ATOL, name


def test_import_then_export_round_trips_weights(trained, tmp_path) -> None:
    from pretrain.checkpoint import CheckpointError, read_full_tensors, resolve

    run_dir, _ = trained
    assert _convert("to-hf", run_dir, tmp_path / "hf").returncode == 0
    assert _convert("from-hf", tmp_path / "hf", tmp_path / "back").returncode == 0
    original = dict(read_full_tensors(resolve(run_dir)))
    back = dict(read_full_tensors(tmp_path / "back"))
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    # the export's tokenizer comes back with the weights, checksummed, for generate and evaluate
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    verified = _convert("inspect", tmp_path / "back", "--verify")
    assert verified.returncode == 0 and "checksums verified" in verified.stdout, verified.stderr
    with pytest.raises(CheckpointError, match="a Hugging Face model directory, not a checkpoint; import it first "
                                              "with python tools/convert_checkpoint.py from-hf"):
        resolve(tmp_path / "hf")  # as checkpoint.init_from=<the export> would


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only LlamaForCausalLM"),
    ({"attention_bias": True}, "no biases"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling"),
])
def test_import_rejects_other_architectures(tmp_path, change, message) -> None:
    hf_dir = tmp_path / "hf"
    _save_llama(hf_dir, seed=0, **IMPORTS["gqa-untied"])
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(change)
    (hf_dir / "config.json").write_text(json.dumps(config))
    result = _convert("from-hf", hf_dir, tmp_path / "ckpt")
    assert result.returncode == 2
    assert message in result.stderr and "config.json" in result.stderr
    assert not (tmp_path / "ckpt").exists()


def test_inspect_prints_layout_and_tensors(trained) -> None:
    run_dir, _ = trained
    result = _convert("inspect", run_dir, "--verify")
    assert result.returncode == 0, result.stderr
    for text in ("step         3", "tp=1", "zero_stage=0", "world_size=1", "embed_tokens.weight", "(1024, 64)",
                 "optim-00000-of-00001.safetensors", "checksums verified", "model.hidden_size=64"):
        assert text in result.stdout, text


def test_help_documents_every_command() -> None:
    result = _convert("--help")
    assert result.returncode == 0
    for text in ("to-hf", "from-hf", "inspect", "DeepSpeed-native checkpoints are not read"):
        assert text in result.stdout
