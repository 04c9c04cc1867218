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
import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from pretrain.files import confined, fsync_dir, sha256_file

FORMAT_VERSION = 1
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
              "tie_embeddings", "kv_channels", "qkv_bias", "qk_norm", "norm_placement")
TOKENIZER_FILE = "tokenizer.json"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW state saved per parameter, as "<name>.<moment>"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"step_\d{8,}")


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
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    path = confined(root, name)
    if path is None or not STEP_DIR.fullmatch(name):
        raise CheckpointError(f"{pointer}: names {name[:80]!r}, not a step_* directory inside {root}; "
                              f"point it at one (e.g. `echo step_00000100 > {pointer}`)")
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
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory; give a step directory, a run's checkpoints/ "
                                  "or a run directory")
        if (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a Hugging Face model directory, not a checkpoint; import it first with "
                                  f"python tools/convert_checkpoint.py from-hf {path} OUT_DIR")
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
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err.strerror}); use an earlier checkpoint") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: corrupt (not a JSON object); use an earlier checkpoint")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is newer than this version of pretrain "
                              f"reads ({FORMAT_VERSION}); upgrade pretrain")
    missing = [k for k in ("step", "model", "tensors", "files", "layout") if k not in manifest]
    if missing:
        raise CheckpointError(f"{path}: corrupt (no {', '.join(missing)}); use an earlier checkpoint")
    _check_names(ckpt, manifest)
    return manifest


def _check_names(ckpt: Path, manifest: dict[str, Any]) -> None:
    """Every file name the manifest gives stays inside the checkpoint directory, and the types fit."""
    where = ckpt / "manifest.json"
    if not isinstance(manifest["step"], int) or manifest["step"] < 0 or not isinstance(manifest["model"], dict) \
            or not isinstance(manifest["tensors"], dict) or not isinstance(manifest["files"], dict):
        raise CheckpointError(f"{where}: corrupt (step, model, tensors or files has the wrong type); "
                              "use an earlier checkpoint")
    names = list(manifest["files"])
    for info in manifest["tensors"].values():
        if not isinstance(info, dict) or "file" not in info:
            raise CheckpointError(f"{where}: corrupt tensor entry {str(info)[:60]}; use an earlier checkpoint")
        names += [info["file"], *([info["optim_file"]] if "optim_file" in info else [])]
    tok = manifest.get("tokenizer")
    if isinstance(tok, dict) and tok.get("file"):
        names.append(tok["file"])
    for name in names:
        if confined(ckpt, name) is None:
            raise CheckpointError(f"{where}: names file {str(name)[:80]!r} outside the checkpoint directory; "
                                  "the manifest is corrupt or crafted, use another checkpoint")
    for name, info in manifest["files"].items():
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{where}: corrupt entry for {name}; use an earlier checkpoint")


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Read the manifest and check every file's size and sha256; the manifest, or CheckpointError."""
    manifest = read_manifest(ckpt)
    verify_files(ckpt, manifest)
    return manifest


def newest_verified(root: Path) -> tuple[Path | None, list[str], list[str]]:
    """The checkpoint to resume from: `latest` if it verifies, else the newest older one that does.

    Returns (checkpoint or None when there is none at all, warnings: one line per checkpoint passed
    over, the names of the checkpoints passed over). Raises CheckpointError when checkpoints exist but
    none verifies. Reads every file of each candidate (the sha256 check), so call it on one rank and
    broadcast the answer.
    """
    if not root.is_dir():
        return None, [], []
    candidates, warnings, bad = [], [], None
    try:
        latest = latest_checkpoint(root)
    except CheckpointError as err:
        latest, bad = None, str(err)
    steps = sorted((p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()), reverse=True)
    if latest is not None:
        candidates = [latest] + [p for p in steps if p.name < latest.name]
    else:
        candidates = steps
    passed_over: list[str] = []
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as err:
            bad = bad or str(err)
            passed_over.append(ckpt.name)
            continue
        if bad:
            more = f" ({len(passed_over)} newer checkpoints do not verify)" if len(passed_over) > 1 else ""
            warnings.append(f"warning: resuming from {ckpt} instead of the newest checkpoint{more}: {bad}")
        return ckpt, warnings, passed_over
    if bad:
        raise CheckpointError(f"no checkpoint in {root} verifies ({bad}); start over in another run.dir, or "
                              "move the damaged checkpoints out of it (nothing was deleted)")
    return None, warnings, passed_over


def verify_files(ckpt: Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check the named (default: all) files exist with the recorded size and sha256."""
    files = manifest["files"]
    for name in names if names is not None else list(files):
        path = confined(ckpt, name)
        if path is None:
            raise CheckpointError(f"{ckpt / 'manifest.json'}: names file {str(name)[:80]!r} outside the "
                                  "checkpoint directory; use another checkpoint")
        if not path.is_file():
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
                tie_embeddings=cfg.tie_embeddings, kv_channels=cfg.head_dim, qkv_bias=cfg.qkv_bias,
                qk_norm=cfg.qk_norm, norm_placement=cfg.norm_placement)


def check_model_shape(manifest: dict[str, Any], model_cfg: dict[str, Any], where: Path) -> None:
    saved, run = effective_shape(manifest["model"]), effective_shape(model_cfg)
    diffs = [f"model.{k}={saved[k]} (this run: {run[k]})" for k in SHAPE_KEYS if saved[k] != run[k]]
    if diffs:
        raise CheckpointError(f"{where / 'manifest.json'}: checkpoint is for a different model: {', '.join(diffs)}; "
                              "use the model config it was saved with (tools/convert_checkpoint.py inspect prints "
                              "it), or another checkpoint (run.dir, checkpoint.init_from)")


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
    for tmp in root.glob(f"{TMP_PREFIX}*step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def prune(root: Path, keep_last: int, damaged: Collection[str] = ()) -> None:
    """Delete the oldest complete checkpoints beyond keep_last, never the one `latest` names and
    never the newest one that verifies.

    Only step_* directories with a manifest count as complete: a temp directory is never one of
    the kept, and is never mistaken for the newest. Before anything is deleted the kept ones are
    verified newest first (sha256 of every file; normally only the checkpoint just written, from
    the page cache): if none of them verifies, the newest older one that does is kept too, so a
    damaged disk never leaves a run with nothing to resume from. `damaged` names checkpoints already
    known not to verify (those a resume passed over): they neither count among the kept nor are
    deleted here, so keep_last good ones remain and the damaged ones stay for the user to inspect.
    """
    if keep_last <= 0:
        return
    latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    damaged = set(damaged) - {latest}
    done = sorted(p for p in root.glob("step_*") if (p / "manifest.json").exists() and p.name not in damaged)
    old, kept = done[:-keep_last], done[-keep_last:]
    if not old:
        return
    keep = {p for p in old if p.name == latest}
    if not any(_verifies(p) for p in reversed(kept)):
        keep |= set(next(([p] for p in reversed(old) if _verifies(p)), []))
    for ckpt in old:
        if ckpt not in keep:
            shutil.rmtree(ckpt, ignore_errors=True)


def _verifies(ckpt: Path) -> bool:
    try:
        verify_checkpoint(ckpt)
        return True
    except CheckpointError:
        return False
