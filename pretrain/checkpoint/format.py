"""The on-disk checkpoint format, independent of any parallel layout.

    <run.dir>/checkpoints/
      latest                     name of the newest complete checkpoint (written last)
      step_00000100/
        manifest.json            format version, step, model config, layout it was saved from,
                                 data position, RNG, resolved config, tensor index, file checksums
        model-00000-of-00002.safetensors    full (TP=1) fp32 weights, split by tensor over writers
        optim-00000-of-00002.safetensors    Adam moments in the same shapes: "<name>.exp_avg" ...
        rng-00000.safetensors               per-rank RNG states: torch CPU, this rank's GPU, Python,
                                            NumPy (restored when the layout is unchanged)
        tokenizer.json           a copy of the run's tokenizer (for Hugging Face export)
      .tmp-step_00000200/        a save in progress (or one interrupted by a crash): never read,
                                 removed by the next save

A checkpoint is written into a hidden temp directory and renamed into place; `latest` is replaced
atomically after that, so a crash at any point leaves the previous checkpoint intact and pointed to.

Manifest keys: format_version, step, optimizer_step, consumed_tokens, model (the ModelConfig),
config (the whole resolved config), layout (tp, dp, zero_stage, precision, world_size: what it was
saved from; informational, any layout loads it), data (the loader's merged position), tokenizer
({dataset_dir, file, vocab_size}), tensors ({name: {file, optim_file, shape, tp_partition_dim}};
optim_file is absent in weights-only checkpoints such as Hugging Face imports), files ({name:
{bytes, sha256}} for every file but the manifest).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pretrain.files import fsync_dir, sha256_file

FORMAT_VERSION = 1
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
              "tie_embeddings")
TOKENIZER_FILE = "tokenizer.json"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW state saved per parameter, as "<name>.<moment>"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def file_record(path: Path) -> dict[str, Any]:
    """The manifest's entry for a written file: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_tensors(path: Path, tensors: dict[str, Any]) -> dict[str, Any]:
    """Write a safetensors file; return its manifest entry."""
    save_file(tensors, str(path))
    return file_record(path)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    fsync_dir(root)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names, if it exists and is complete."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "manifest.json").exists():
        raise CheckpointError(f"{pointer} names {path.name}, which has no manifest.json; "
                              f"point {pointer} at a complete step_* directory")
    return path


def resolve(path: str | os.PathLike) -> Path:
    """Accept a step directory, a checkpoints/ directory or a run directory."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "latest").exists():
            found = latest_checkpoint(candidate)
            if found is not None:
                return found
    if not (path / "manifest.json").exists():
        raise CheckpointError(f"{path}: not a checkpoint (no manifest.json and no latest pointer)")
    return path


def read_manifest(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt ({err}); use an earlier checkpoint") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is newer than this version of pretrain "
                              f"reads ({FORMAT_VERSION}); upgrade pretrain")
    missing = [k for k in ("step", "model", "tensors", "files", "layout") if k not in manifest]
    if missing:
        raise CheckpointError(f"{path}: corrupt (no {', '.join(missing)}); use an earlier checkpoint")
    return manifest


def verify_files(ckpt: Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check the named (default: all) files exist with the recorded size and sha256."""
    files = manifest["files"]
    for name in names if names is not None else list(files):
        path = ckpt / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing; the checkpoint is incomplete, use an earlier one")
        info = files[name]
        if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupt or truncated); use an earlier checkpoint")


def effective_shape(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The shape keys with defaults resolved (num_kv_heads=None means num_heads, and so on)."""
    from pretrain.config import ModelConfig

    cfg = ModelConfig(**{k: model_cfg[k] for k in SHAPE_KEYS if k in model_cfg})
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                num_heads=cfg.num_heads, num_kv_heads=cfg.kv_heads, ffn_hidden_size=cfg.ffn_size,
                tie_embeddings=cfg.tie_embeddings)


def check_model_shape(manifest: dict[str, Any], model_cfg: dict[str, Any], where: Path) -> None:
    saved, run = effective_shape(manifest["model"]), effective_shape(model_cfg)
    diffs = [f"model.{k}={saved[k]} (this run: {run[k]})" for k in SHAPE_KEYS if saved[k] != run[k]]
    if diffs:
        raise CheckpointError(f"{where / 'manifest.json'}: checkpoint is for a different model: {', '.join(diffs)}; "
                              "use the matching model config or another run.dir")


def tokenizer_source(dataset_dir: str | Path) -> Path | None:
    """The tokenizer file of a dataset directory (as pretrain.data.load_tokenizer finds it), if any."""
    from pretrain.data.manifest import MANIFEST_NAME, DatasetError
    from pretrain.data.manifest import read_manifest as read_dataset_manifest

    root = Path(dataset_dir)
    path = root / TOKENIZER_FILE
    if (root / MANIFEST_NAME).is_file():
        try:
            info = read_dataset_manifest(root).tokenizer
        except DatasetError:
            return None
        path = root / info.file if info is not None else path
    return path if path.is_file() else None


def remove_interrupted(root: Path) -> None:
    """Delete the temp directories of saves that never finished (a crash or kill mid-save)."""
    for tmp in root.glob(f"{TMP_PREFIX}step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Delete the oldest complete checkpoints beyond keep_last, never the one `latest` names.

    Only step_* directories with a manifest count as complete: a temp directory is never one of
    the kept, and is never mistaken for the newest.
    """
    if keep_last <= 0:
        return
    latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    done = sorted(p for p in root.glob("step_*") if (p / "manifest.json").exists())
    for old in done[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
