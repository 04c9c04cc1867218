"""Checkpoints without a process group: read full tensors, write weights-only checkpoints, summarise.

Used by tools/convert_checkpoint.py (Hugging Face export and import, inspect). A checkpoint's
tensors are already full (TP=1) tensors, so nothing here needs to know any parallel layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from pretrain.checkpoint.format import (FORMAT_VERSION, MOMENTS, SHAPE_KEYS, TOKENIZER_FILE, file_record,
                                        read_manifest, tokenizer_source, verify_files, write_json_atomic,
                                        write_tensors)
from pretrain.files import atomic_directory

FILE_BYTES = 2 << 30  # split weights-only checkpoints into files of at most ~2 GiB


def iter_tensors(ckpt: Path, manifest: dict[str, Any] | None = None,
                 moments: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full fp32 tensor), one at a time, after verifying every file's checksum."""
    manifest = manifest or read_manifest(ckpt)
    verify_files(ckpt, manifest)
    handles: dict[str, Any] = {}

    def get(fname: str, key: str) -> torch.Tensor:
        if fname not in handles:
            handles[fname] = safe_open(str(ckpt / fname), framework="pt")
        return handles[fname].get_tensor(key)

    for name, info in manifest["tensors"].items():
        yield name, get(info["file"], name)
        if moments and "optim_file" in info:
            for key in MOMENTS:
                yield f"{name}.{key}", get(info["optim_file"], f"{name}.{key}")


def write_weights_only(out: Path, tensors: Iterator[tuple[str, torch.Tensor]], model_cfg: dict[str, Any],
                       meta: dict[str, Any], tokenizer: Path | None = None) -> Path:
    """Write a step-0 checkpoint with weights and no optimizer state into the new directory out,
    with a copy of `tokenizer` (a tokenizer.json) if given, as a run's checkpoint carries its own.

    Such a checkpoint starts a run with `checkpoint.init_from=<out>`; resuming from it is refused
    (there are no Adam moments). Written into a temp directory and renamed, like every checkpoint.
    """
    out = Path(out)
    with atomic_directory(out) as tmp:
        groups: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, value in tensors:
            nbytes = value.numel() * 4
            if groups[-1] and size + nbytes > FILE_BYTES:
                groups.append({})
                size = 0
            groups[-1][name] = value.float().contiguous()
            size += nbytes
        index, files = {}, {}
        for i, group in enumerate(groups):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            files[fname] = write_tensors(tmp / fname, group)
            for name, value in group.items():
                index[name] = {"file": fname, "shape": list(value.shape), "tp_partition_dim": None}
            group.clear()
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            files[TOKENIZER_FILE] = file_record(tmp / TOKENIZER_FILE)
            meta = dict(meta, tokenizer=dict(meta.get("tokenizer") or {}, file=TOKENIZER_FILE))
        manifest = dict(meta, format_version=FORMAT_VERSION, step=0, optimizer_step=0, consumed_tokens=0,
                        model=model_cfg, config=meta.get("config", {"model": model_cfg}), data=None,
                        tensors=index, files=files, layout=meta.get("layout", {}))
        write_json_atomic(tmp / "manifest.json", manifest)
    return out


def model_overrides(model_cfg: dict[str, Any]) -> list[str]:
    """The command-line overrides that build the model a checkpoint holds."""
    keys = [*SHAPE_KEYS, "max_seq_len", "rope_theta", "norm_eps", "rope_scaling", "rope_factor",
            "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len"]
    def text(value: Any) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    if not model_cfg.get("rope_scaling"):  # the rope_* shape keys mean nothing without scaling
        keys = [k for k in keys if not k.startswith("rope_") or k == "rope_theta"]
    return [f"model.{k}={text(model_cfg[k])}" for k in keys if k in model_cfg]


def summary(ckpt: Path, verify: bool = False) -> str:
    """A human-readable account of a checkpoint: what, when, from which layout, how big."""
    manifest = read_manifest(ckpt)
    if verify:
        verify_files(ckpt, manifest)
    layout = manifest.get("layout", {})
    model = manifest["model"]
    lines = [f"checkpoint   {ckpt}",
             f"format       version {manifest['format_version']}",
             f"step         {manifest['step']} (optimizer step {manifest.get('optimizer_step')}, "
             f"consumed tokens {manifest.get('consumed_tokens', 0):,})",
             "saved from   " + (", ".join(f"{k}={v}" for k, v in layout.items()) or "unknown"),
             f"model        {model.get('name', '?')}: " + " ".join(model_overrides(model))]
    tok = manifest.get("tokenizer") or {}
    if isinstance(tok, str):  # written before the tokenizer entry became a dict
        tok = {"dataset_dir": tok}
    lines.append(f"tokenizer    {tok.get('file') or '(not copied)'}"
                 + (f" (from {tok['dataset_dir']})" if tok.get("dataset_dir") else ""))
    data = manifest.get("data")
    lines.append(f"data         {'position recorded' if data else 'none (weights-only checkpoint)'}")
    tensors = manifest["tensors"]
    numel = {name: int(torch.Size(info["shape"]).numel()) for name, info in tensors.items()}
    has_optim = any("optim_file" in info for info in tensors.values())
    total = sum(numel.values())
    optim = f"{total * 8 / 1e6:.1f} MB Adam moments" if has_optim else "no optimizer state"
    lines.append(f"tensors      {len(tensors)}, {total:,} parameters ({total * 4 / 1e6:.1f} MB fp32 weights, {optim})")
    width = max(len(n) for n in tensors)
    for name, info in tensors.items():
        lines.append(f"  {name:<{width}}  {str(tuple(info['shape'])):<16} {numel[name] * 4:>12,} B  {info['file']}")
    files = manifest["files"]
    lines.append(f"files        {len(files) + 1} ({sum(f['bytes'] for f in files.values()):,} bytes besides "
                 f"manifest.json){'; checksums verified' if verify else ''}")
    for fname, info in sorted(files.items()):
        lines.append(f"  {fname:<{width}}  {info['bytes']:>12,} B  sha256 {info['sha256'][:16]}…")
    return "\n".join(lines)


def summary_json(ckpt: Path) -> str:
    manifest = read_manifest(ckpt)
    return json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=1, sort_keys=True)


def checkpoint_tokenizer(ckpt: Path, manifest: dict[str, Any]) -> Path | None:
    """The tokenizer file a checkpoint carries, or the one in the dataset it names, if any."""
    tok = manifest.get("tokenizer") or {}
    if isinstance(tok, str):
        tok = {"dataset_dir": tok}
    if tok.get("file") and (ckpt / tok["file"]).is_file():
        return ckpt / tok["file"]
    if tok.get("dataset_dir") and Path(tok["dataset_dir"]).is_dir():
        return tokenizer_source(tok["dataset_dir"])
    return None

