"""Hugging Face Llama <-> our checkpoints: the library behind tools/convert_checkpoint.py.

Our module names are Hugging Face Llama's without the `model.` prefix (pretrain/model/gpt.py) and
our RoPE is the same rotate-half form, so conversion is renaming plus a config mapping:

    ours                                   Hugging Face LlamaForCausalLM
    embed_tokens.weight                    model.embed_tokens.weight
    layers.N.self_attn.{q,k,v,o}_proj      model.layers.N.self_attn.{q,k,v,o}_proj
    layers.N.mlp.{gate,up,down}_proj       model.layers.N.mlp.{gate,up,down}_proj
    layers.N.{input,post_attention}_layernorm, norm    (same, under model.)
    lm_head.weight                         lm_head.weight (absent when embeddings are tied)

Export writes config.json (LlamaConfig), safetensors weights and the run's tokenizer, so
AutoTokenizer / AutoModelForCausalLM.from_pretrained(out) work. Import accepts a local
LlamaForCausalLM directory in safetensors and writes a weights-only checkpoint at step 0.
DeepSpeed-native checkpoints are not read: this system never writes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pretrain.checkpoint.format import read_manifest, resolve
from pretrain.checkpoint.offline import checkpoint_tokenizer, iter_tensors, write_weights_only
from pretrain.files import atomic_directory, confined

HF_PREFIX = "model."
SHARD_BYTES = 5 << 30  # Hugging Face's default max_shard_size
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the file and what is wrong."""


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def from_hf_name(name: str) -> str:
    return name.removeprefix(HF_PREFIX)


def llama_config(model: dict[str, Any], eos_id: int | None = None, dtype: str = "fp32"):
    """A transformers LlamaConfig with our ModelConfig's sizes (a dict, as in manifests)."""
    try:
        from transformers import LlamaConfig
    except ImportError:
        raise ConversionError('exporting to Hugging Face needs transformers: pip install -e ".[hf]"') from None

    from pretrain.config import ModelConfig

    cfg = ModelConfig(**{k: v for k, v in model.items() if k in ModelConfig.__dataclass_fields__})
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_bias=False, mlp_bias=False, initializer_range=cfg.init_std,
        rope_scaling=None if cfg.rope_scaling is None else {
            "rope_type": cfg.rope_scaling, "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len},
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
        torch_dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
        architectures=["LlamaForCausalLM"])


def _write_hf_weights(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, dtype: torch.dtype) -> None:
    """Hugging Face's layout: model.safetensors, or numbered shards plus model.safetensors.index.json."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, value in tensors:
        value = value.to(dtype).contiguous()
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        shard.clear()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def to_hf(ckpt: str | Path, out: str | Path, tokenizer: str | Path | None = None, dtype: str = "fp32",
          with_tokenizer: bool = True) -> Path:
    """Export a checkpoint (step dir, checkpoints/ dir or run dir) as a Hugging Face Llama directory.

    The tokenizer comes from `tokenizer` (a dataset directory or tokenizer.json), else the copy in
    the checkpoint, else the dataset directory the manifest names. Refuses a non-empty out.
    """
    ckpt, out = resolve(ckpt), Path(out)
    with atomic_directory(out) as tmp:
        _export(ckpt, tmp, tokenizer, dtype, with_tokenizer)
    return out


def _export(ckpt: Path, tmp: Path, tokenizer: str | Path | None, dtype: str, with_tokenizer: bool) -> None:
    from pretrain.data.tokenizer import eos_id, load_tokenizer, save_hf_tokenizer

    manifest = read_manifest(ckpt)
    source = Path(tokenizer) if tokenizer else checkpoint_tokenizer(ckpt, manifest)
    if with_tokenizer and source is None:
        raise ConversionError(f"{ckpt / 'manifest.json'}: records no tokenizer that still exists; pass "
                              "--tokenizer DATASET_DIR_OR_TOKENIZER_JSON, or --no-tokenizer for weights only")
    eos = None
    if with_tokenizer:
        tok = load_tokenizer(source)
        eos = eos_id(tok)
        if tok.get_vocab_size() > manifest["model"]["vocab_size"]:
            raise ConversionError(f"{source}: tokenizer has {tok.get_vocab_size()} tokens, more than the model's "
                                  f"{manifest['model']['vocab_size']}; pass the run's own tokenizer")
    llama_config(manifest["model"], eos, dtype).save_pretrained(str(tmp))
    tensors = ((to_hf_name(name), value) for name, value in iter_tensors(ckpt, manifest))
    _write_hf_weights(tensors, tmp, DTYPES[dtype])
    if with_tokenizer:
        save_hf_tokenizer(source, tmp)


def _hf_rope(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """rope_theta and our rope_* keys from config.json (rope_parameters in transformers 5, rope_scaling before)."""
    scaled = [d for d in (config.get("rope_parameters") or {}, config.get("rope_scaling") or {})
              if d.get("rope_type", d.get("type")) not in (None, "default")]
    params = scaled[0] if scaled else (config.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type"))
    theta = (config.get("rope_parameters") or {}).get("rope_theta", params.get("rope_theta"))
    out: dict[str, Any] = {"rope_theta": float(theta if theta is not None else config.get("rope_theta", 10000.0))}
    if kind in (None, "default"):
        return out
    if kind != "llama3":
        raise ConversionError(f"{where}: RoPE scaling {kind!r} is not supported (only llama3)")
    return dict(out, rope_scaling="llama3", rope_factor=float(params["factor"]),
                rope_low_freq_factor=float(params["low_freq_factor"]),
                rope_high_freq_factor=float(params["high_freq_factor"]),
                rope_original_max_seq_len=int(params["original_max_position_embeddings"]))


def model_config_from_hf(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """Our ModelConfig (as a dict) for a Hugging Face Llama config.json; ConversionError otherwise."""
    from pretrain.config import ModelConfig

    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or (archs and archs != ["LlamaForCausalLM"]):
        raise ConversionError(f"{where}: model_type={config.get('model_type')!r}, architectures={archs}; only "
                              "LlamaForCausalLM checkpoints can be imported")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ConversionError(f"{where}: {key}=true; our model has no biases, so this checkpoint "
                                  "cannot be imported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={config['hidden_act']!r}; only silu (SwiGLU) is supported")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise ConversionError(f"{where}: head_dim={config.get('head_dim')} is not hidden_size/num_attention_heads "
                              f"({hidden}/{heads}); our model derives head size from those")
    model = ModelConfig(
        name=f"hf-{Path(where).parent.name}", vocab_size=config["vocab_size"], hidden_size=hidden,
        num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, ffn_hidden_size=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 4096), **_hf_rope(config, where),
        norm_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02))
    return asdict(model)


def expected_names(model: dict[str, Any]) -> list[str]:
    """Our parameter names for a model config, in the model's order."""
    names = ["embed_tokens.weight"]
    for i in range(model["num_layers"]):
        p = f"layers.{i}."
        names += [p + "input_layernorm.weight"]
        names += [f"{p}self_attn.{k}_proj.weight" for k in "qkvo"]
        names += [p + "post_attention_layernorm.weight"]
        names += [f"{p}mlp.{k}_proj.weight" for k in ("gate", "up", "down")]
    names.append("norm.weight")
    if not model["tie_embeddings"]:
        names.append("lm_head.weight")
    return names


def expected_shape(name: str, model: dict[str, Any]) -> list[int]:
    h, v, f = model["hidden_size"], model["vocab_size"], model["ffn_hidden_size"]
    hd = h // model["num_heads"]
    q, kv = model["num_heads"] * hd, (model["num_kv_heads"] or model["num_heads"]) * hd
    leaf = name.rsplit(".", 2)[-2]
    return {"embed_tokens": [v, h], "lm_head": [v, h], "q_proj": [q, h], "k_proj": [kv, h], "v_proj": [kv, h],
            "o_proj": [h, q], "gate_proj": [f, h], "up_proj": [f, h], "down_proj": [h, f]}.get(leaf, [h])


def _hf_weight_files(hf_dir: Path) -> dict[str, Path]:
    """{hf tensor name: file} from model.safetensors or its sharded index."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: (fname, confined(hf_dir, fname)) for name, fname in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ConversionError(f"{index}: not a valid safetensors index ({type(err).__name__}: {err})") from None
        outside = [fname for fname, path in files.values() if path is None]
        if outside:
            raise ConversionError(f"{index}: names weight file {str(outside[0])[:80]!r} outside {hf_dir}; "
                                  "the index is corrupt or crafted")
        return {name: path for name, (_, path) in files.items()}
    single = hf_dir / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except SafetensorError as err:
            raise ConversionError(f"{single}: not a valid safetensors file ({err})") from None
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise ConversionError(f"{hf_dir}: has only pickle (.bin/.pt) weights; re-save them with "
                              "model.save_pretrained(dir, safe_serialization=True) and convert that")
    raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def from_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Import a local Hugging Face LlamaForCausalLM directory as a weights-only checkpoint at out."""
    hf_dir, out = Path(hf_dir), Path(out)
    config_path = hf_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{config_path}: missing; HF_DIR must be a Hugging Face model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path}: not a JSON object; HF_DIR must be a Hugging Face model directory")
    try:
        model = model_config_from_hf(config, config_path)
    except ConversionError:
        raise
    except KeyError as err:
        raise ConversionError(f"{config_path}: has no {err.args[0]!r}; not a complete Llama config") from None
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ConversionError(f"{config_path}: a size has the wrong type or value ({err})") from None
    files = _hf_weight_files(hf_dir)
    biases = sorted(n for n in files if n.endswith(".bias"))
    if biases:
        raise ConversionError(f"{files[biases[0]]}: has bias tensors ({biases[0]}, ...); our model has no biases")
    want = expected_names(model)
    have = {from_hf_name(n): n for n in files if not n.endswith("rotary_emb.inv_freq")}
    if model["tie_embeddings"]:
        have.pop("lm_head.weight", None)  # some tied exports store the shared matrix twice
    missing, extra = [n for n in want if n not in have], sorted(set(have) - set(want))
    if missing or extra:
        raise ConversionError(f"{hf_dir}: weights do not match config.json: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        handles: dict[Path, Any] = {}
        for name in want:
            path = files[have[name]]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            value = handles[path].get_tensor(have[name])
            if list(value.shape) != expected_shape(name, model):
                raise ConversionError(f"{path}: {have[name]} has shape {list(value.shape)}, config.json implies "
                                      f"{expected_shape(name, model)}")
            yield name, value.float()

    # The Hugging Face tokenizer is not copied: training reads its tokenizer from the dataset.
    meta = {"source": {"huggingface": str(hf_dir.resolve())},
            "layout": {"source": "huggingface", "tp": 1, "dp": 1, "zero_stage": None},
            "tokenizer": {"dataset_dir": None, "file": None}}
    return write_weights_only(out, tensors(), model, meta)
