"""Hugging Face <-> our checkpoints: the library behind tools/convert_checkpoint.py.

Four Hugging Face architectures are this model with some switches set (pretrain/model/gpt.py):

    architecture          model_type   our switches
    LlamaForCausalLM      llama        (none; Llama 3 RoPE scaling with model.rope_scaling=llama3)
    Qwen2ForCausalLM      qwen2        model.qkv_bias=true                (Qwen2 and Qwen2.5)
    Qwen3ForCausalLM      qwen3        model.qk_norm=head
    Olmo2ForCausalLM      olmo2        model.qk_norm=full model.norm_placement=post

Our module names are Hugging Face's without the `model.` prefix and our RoPE is the same
rotate-half form, so conversion is renaming plus a config mapping:

    ours                                   Hugging Face
    embed_tokens.weight                    model.embed_tokens.weight
    layers.N.self_attn.{q,k,v,o}_proj      model.layers.N.self_attn.{q,k,v,o}_proj (.weight; q/k/v .bias in Qwen2)
    layers.N.self_attn.{q,k}_norm          model.layers.N.self_attn.{q,k}_norm (Qwen3, OLMo 2)
    layers.N.mlp.{gate,up,down}_proj       model.layers.N.mlp.{gate,up,down}_proj
    layers.N.{input,post_attention}_layernorm, norm    (same, under model.; OLMo 2: post_attention_layernorm
                                           and post_feedforward_layernorm)
    lm_head.weight                         lm_head.weight (absent when embeddings are tied)

Export writes config.json (the architecture's config), safetensors weights and the run's tokenizer,
so AutoTokenizer / AutoModelForCausalLM.from_pretrained(out) work. Import accepts a local directory
of one of these architectures in safetensors and writes a weights-only checkpoint at step 0.
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


# architecture -> (model_type, the switches of ours it implies)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", dict(qkv_bias=False, qk_norm=None, norm_placement="pre")),
    "Qwen2ForCausalLM": ("qwen2", dict(qkv_bias=True, qk_norm=None, norm_placement="pre")),
    "Qwen3ForCausalLM": ("qwen3", dict(qkv_bias=False, qk_norm="head", norm_placement="pre")),
    "Olmo2ForCausalLM": ("olmo2", dict(qkv_bias=False, qk_norm="full", norm_placement="post")),
}


def architecture(model: dict[str, Any]) -> str:
    """The Hugging Face architecture a model config (a dict, as in manifests) exports to."""
    switches = dict(qkv_bias=bool(model.get("qkv_bias", False)), qk_norm=model.get("qk_norm"),
                    norm_placement=model.get("norm_placement", "pre"))
    for arch, (_, implied) in FAMILIES.items():
        if implied == switches:
            return arch
    raise ConversionError(f"model.qkv_bias={str(switches['qkv_bias']).lower()}, model.qk_norm={switches['qk_norm']}, "
                          f"model.norm_placement={switches['norm_placement']}: no Hugging Face architecture has "
                          "this combination; export needs one of " + ", ".join(
                              f"{a} ({' '.join(f'{k}={v}' for k, v in s.items())})" for a, (_, s) in FAMILIES.items()))


def hf_config(model: dict[str, Any], eos_id: int | None = None, dtype: str = "fp32"):
    """The transformers config (LlamaConfig, Qwen2Config, ...) for our ModelConfig (a dict, as in manifests)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConversionError('exporting to Hugging Face needs transformers: pip install -e ".[hf]"') from None

    from pretrain.config import ModelConfig

    arch = architecture(model)
    model_type = FAMILIES[arch][0]
    cfg = ModelConfig(**{k: v for k, v in model.items() if k in ModelConfig.__dataclass_fields__})
    extra: dict[str, Any] = {"llama": dict(attention_bias=False, mlp_bias=False),
                             "qwen2": dict(use_sliding_window=False),
                             "qwen3": dict(attention_bias=False, use_sliding_window=False),
                             "olmo2": dict(attention_bias=False)}[model_type]
    return AutoConfig.for_model(
        model_type,
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        initializer_range=cfg.init_std,
        rope_scaling=None if cfg.rope_scaling is None else {
            "rope_type": cfg.rope_scaling, "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len},
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None,
        torch_dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
        architectures=[arch], **extra)


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
    """Export a checkpoint (step dir, checkpoints/ dir or run dir) as a Hugging Face directory of the
    architecture its model switches name (Llama, Qwen2, Qwen3 or OLMo 2).

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
    hf_config(manifest["model"], eos, dtype).save_pretrained(str(tmp))
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
    """Our ModelConfig (as a dict) for a Hugging Face config.json of a FAMILIES architecture; ConversionError otherwise."""
    from pretrain.config import ModelConfig

    archs = config.get("architectures") or []
    model_types = {model_type: arch for arch, (model_type, _) in FAMILIES.items()}
    arch = model_types.get(config.get("model_type"))
    if arch is None or (archs and archs != [arch]):
        raise ConversionError(f"{where}: model_type={config.get('model_type')!r}, architectures={archs}; only "
                              f"{', '.join(FAMILIES)} checkpoints can be imported")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ConversionError(f"{where}: {key}=true; our model has no biases there (only on q/k/v, as "
                                  "Qwen2 has), so this checkpoint cannot be imported")
    if config.get("use_sliding_window"):
        raise ConversionError(f"{where}: use_sliding_window=true; our model has no sliding-window attention")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={config['hidden_act']!r}; only silu (SwiGLU) is supported")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    model = ModelConfig(
        name=f"hf-{Path(where).parent.name}", vocab_size=config["vocab_size"], hidden_size=hidden,
        num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, ffn_hidden_size=config["intermediate_size"],
        kv_channels=None if head_dim * heads == hidden else head_dim,
        max_seq_len=config.get("max_position_embeddings", 4096), **_hf_rope(config, where),
        norm_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=config.get("initializer_range", 0.02), **FAMILIES[arch][1])
    return asdict(model)


def _norm_names(model: dict[str, Any]) -> tuple[str, str]:
    return (("post_attention_layernorm", "post_feedforward_layernorm") if model.get("norm_placement") == "post"
            else ("input_layernorm", "post_attention_layernorm"))


def expected_names(model: dict[str, Any]) -> list[str]:
    """Our parameter names for a model config, in the model's order."""
    first, second = _norm_names(model)
    names = ["embed_tokens.weight"]
    for i in range(model["num_layers"]):
        p = f"layers.{i}."
        names += [f"{p}{first}.weight"]
        names += [f"{p}self_attn.{k}_proj.weight" for k in "qkvo"]
        if model.get("qkv_bias"):
            names += [f"{p}self_attn.{k}_proj.bias" for k in "qkv"]
        if model.get("qk_norm"):
            names += [f"{p}self_attn.{k}_norm.weight" for k in "qk"]
        names += [f"{p}{second}.weight"]
        names += [f"{p}mlp.{k}_proj.weight" for k in ("gate", "up", "down")]
    names.append("norm.weight")
    if not model["tie_embeddings"]:
        names.append("lm_head.weight")
    return names


def expected_shape(name: str, model: dict[str, Any]) -> list[int]:
    h, v, f = model["hidden_size"], model["vocab_size"], model["ffn_hidden_size"]
    hd = model.get("kv_channels") or h // model["num_heads"]
    q, kv = model["num_heads"] * hd, (model["num_kv_heads"] or model["num_heads"]) * hd
    module, leaf = name.rsplit(".", 2)[-2:]
    if leaf == "bias":
        return [q] if module == "q_proj" else [kv]
    if module in ("q_norm", "k_norm"):
        return [hd] if model.get("qk_norm") == "head" else [q] if module == "q_norm" else [kv]
    return {"embed_tokens": [v, h], "lm_head": [v, h], "q_proj": [q, h], "k_proj": [kv, h], "v_proj": [kv, h],
            "o_proj": [h, q], "gate_proj": [f, h], "up_proj": [f, h], "down_proj": [h, f]}.get(module, [h])


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
    """Import a local Hugging Face directory (Llama, Qwen2, Qwen3 or OLMo 2) as a weights-only checkpoint at out."""
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
        raise ConversionError(f"{config_path}: has no {err.args[0]!r}; not a complete model config") from None
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ConversionError(f"{config_path}: a size has the wrong type or value ({err})") from None
    files = _hf_weight_files(hf_dir)
    want = expected_names(model)
    biases = sorted(n for n in files if n.endswith(".bias") and from_hf_name(n) not in want)
    if biases:
        raise ConversionError(f"{files[biases[0]]}: has bias tensors ({biases[0]}, ...) that config.json does not "
                              "imply; our model has biases only on q/k/v (Qwen2)")
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

    # Its tokenizer.json is copied for generate, evaluate and a later export; training still reads
    # the tokenizer of its dataset (which must be this one for the weights to mean anything).
    tokenizer = hf_dir / "tokenizer.json"
    meta = {"source": {"huggingface": str(hf_dir.resolve())},
            "layout": {"source": "huggingface", "tp": 1, "dp": 1, "zero_stage": None},
            "tokenizer": {"dataset_dir": None, "file": None}}
    return write_weights_only(out, tensors(), model, meta, tokenizer if tokenizer.is_file() else None)
