"""A trained model in one process, for the tools: from a checkpoint or a Hugging Face export.

Checkpoints hold full (TP=1) tensors, so any of them loads into a single-process model; a
Hugging Face directory written by `convert_checkpoint.py to-hf` (or any Llama, Qwen2, Qwen3 or OLMo 2 one)
loads by renaming its tensors. The model is our own GPT, so tools measure the code that trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from pretrain.checkpoint.format import CheckpointError, read_manifest, resolve


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer | None
    model_config: dict[str, Any]
    source: Path
    manifest: dict[str, Any] | None  # None for a Hugging Face directory
    device: torch.device

    @property
    def run_config(self) -> dict[str, Any]:
        """The resolved training configuration of the run that wrote the checkpoint ({} for HF)."""
        return (self.manifest or {}).get("config") or {}


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "manifest.json").is_file()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(requested)


def _hf_tensors(hf_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    from pretrain.hf import _hf_weight_files, from_hf_name, model_config_from_hf

    config_path = hf_dir / "config.json"
    model_cfg = model_config_from_hf(json.loads(config_path.read_text()), config_path)
    tensors: dict[str, torch.Tensor] = {}
    for name, path in _hf_weight_files(hf_dir).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        with safe_open(str(path), framework="pt") as f:
            tensors[from_hf_name(name)] = f.get_tensor(name).float()
    if model_cfg["tie_embeddings"]:
        tensors.pop("lm_head.weight", None)
    return model_cfg, tensors


def load_full_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy checkpoint tensors (unfused, TP=1 names) into a single-process model, joining the parts
    of fused weights (q/k/v, gate/up) as pretrain.parallel.sharding lays them out."""
    from pretrain.parallel.sharding import logical_names, merge_full

    used: set[str] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            names = logical_names(name, param)
            missing = [n for n in names if n not in tensors]
            if missing:
                raise CheckpointError(f"{where}: has no tensor {missing[0]} for the model it describes")
            full = merge_full(param, [tensors[n] for n in names])
            if full.shape != param.shape:
                raise CheckpointError(f"{where}: {name} has shape {list(full.shape)}, the model expects "
                                      f"{list(param.shape)}")
            param.copy_(full)
            used.update(names)
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{where}: tensors the model does not have: {extra[:3]}")


def load_model(source: str | Path, device: str = "auto", tokenizer: str | Path | None = None) -> LoadedModel:
    """Build our GPT in this process (a world of one) with the weights of `source`.

    source: a step directory, a run's checkpoints/ or run directory, or a Hugging Face directory.
    The tokenizer comes from `tokenizer` if given, else the checkpoint's copy or the HF directory.
    """
    from pretrain.checkpoint.offline import checkpoint_tokenizer, iter_tensors
    from pretrain.config import ModelConfig
    from pretrain.data import load_tokenizer
    from pretrain.model import GPT
    from pretrain.parallel.groups import init_distributed

    path = Path(source)
    dev = pick_device(device)
    given = load_tokenizer(tokenizer) if tokenizer else None  # a wrong path is an error, not "no tokenizer"
    if is_hf_dir(path):
        model_cfg, tensors = _hf_tensors(path)
        manifest, tok_source = None, path
    else:
        path = resolve(path)
        manifest = read_manifest(path)
        model_cfg = manifest["model"]
        tensors = dict(iter_tensors(path, manifest))
        tok_source = checkpoint_tokenizer(path, manifest)
    init_distributed(1, dev.type)  # megatron-core's layers need their (trivial) process groups
    cfg = ModelConfig(**{k: v for k, v in model_cfg.items() if k in ModelConfig.__dataclass_fields__})
    model = GPT(cfg, attention="sdpa", on_cuda=dev.type == "cuda")
    load_full_tensors(model, tensors, path)
    model = model.to(dev).eval()
    tok = given or (load_tokenizer(tok_source) if tok_source is not None and Path(tok_source).exists() else None)
    return LoadedModel(model, tok, model_cfg, path, manifest, dev)
