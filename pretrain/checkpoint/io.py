"""Save and load checkpoints from and into any TP x DP x ZeRO layout.

Saving: every rank takes part in gathering each parameter to its full shape (a TP all-gather, and
under ZeRO a DP gather), but parameter i is written only by rank i % world_size, so each rank
holds and writes about 1/world_size of the model and of the optimizer moments; peak extra memory
is one full parameter plus that share. Loading: each rank reads full tensors lazily from the
safetensors files (one tensor at a time) and keeps its own shard, which reshards to any layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.checkpoint.format import (FORMAT_VERSION, CheckpointError, check_model_shape, fsync_dir,
                                        prune, read_manifest, sha256_file, step_dir_name, verify_files,
                                        write_json_atomic, write_latest)
from pretrain.checkpoint.state import MOMENTS, get_moment, get_param, set_moment, set_optimizer_step, set_param
from pretrain.parallel import sharding


def _agree_on_errors(error: str | None) -> list[str]:
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [f"rank {r}: {e}" for r, e in enumerate(errors) if e]


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def save(engine, root: Path, step: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` under root atomically and point `latest` at it; collective."""
    model = engine.module
    rank, world = dist.get_rank(), dist.get_world_size()
    name = step_dir_name(step)
    final, tmp = root / name, root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of an interrupted save of this step
        tmp.mkdir()
    dist.barrier()

    model_file, optim_file = f"model-{rank:05d}-of-{world:05d}.safetensors", f"optim-{rank:05d}-of-{world:05d}.safetensors"
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    index: dict[str, dict[str, Any]] = {}
    for i, (pname, param) in enumerate(model.named_parameters()):
        full = sharding.gather(get_param(param), param)
        full_moments = {k: sharding.gather(get_moment(engine, param, k), param) for k in MOMENTS}
        writer = i % world
        index[pname] = {"file": f"model-{writer:05d}-of-{world:05d}.safetensors",
                        "optim_file": f"optim-{writer:05d}-of-{world:05d}.safetensors",
                        "shape": list(full.shape), "tp_partition_dim": sharding.partition_dim(param)}
        if writer == rank:
            weights[pname] = full.contiguous()
            moments.update({f"{pname}.{k}": v.contiguous() for k, v in full_moments.items()})

    error, files = None, {}
    try:
        written = [(model_file, weights), (optim_file, moments), (f"rng-{rank:05d}.safetensors", _rng_tensors())]
        for fname, tensors in written:
            if tensors or not fname.startswith(("model", "optim")):
                save_file(tensors, str(tmp / fname))
                files[fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": sha256_file(tmp / fname)}
    except OSError as err:
        error = str(err)
    errors = _agree_on_errors(error)
    all_files: list[Any] = [None] * world
    dist.all_gather_object(all_files, files)
    if rank == 0 and not errors:
        try:
            manifest = dict(meta, format_version=FORMAT_VERSION, step=step, tensors=index,
                            files={k: v for f in all_files for k, v in f.items()},
                            layout=dict(meta.get("layout", {}), world_size=world))
            write_json_atomic(tmp / "manifest.json", manifest)
            fsync_dir(tmp)
            if final.exists():  # the same step saved before (e.g. a resumed run's final save)
                shutil.rmtree(tmp)
            else:
                tmp.rename(final)
            write_latest(root, name)
            prune(root, keep_last)
        except OSError as err:
            errors = [f"rank 0: {err}"]
    outcome: list[Any] = [errors]
    dist.broadcast_object_list(outcome, src=0)
    errors = outcome[0]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving checkpoint {final} failed ({'; '.join(errors)}); the previous "
                              f"checkpoint in {root} is intact; free disk space or change run.dir")
    return final


def load(engine, ckpt: Path, model_cfg: dict[str, Any], weights_only: bool = False) -> dict[str, Any]:
    """Load checkpoint `ckpt` into this rank's shards; returns the manifest. Collective."""
    manifest = read_manifest(ckpt)
    check_model_shape(manifest, model_cfg, ckpt)
    error = None
    if dist.get_rank() == 0:
        try:
            verify_files(ckpt, manifest)
        except CheckpointError as err:
            error = str(err)
    errors: list[Any] = [error]
    dist.broadcast_object_list(errors, src=0)
    if errors[0]:
        raise CheckpointError(errors[0])

    handles: dict[str, Any] = {}

    def tensor(fname: str, key: str) -> torch.Tensor:
        if fname not in handles:
            handles[fname] = safe_open(str(ckpt / fname), framework="pt")
        return handles[fname].get_tensor(key)

    for pname, param in engine.module.named_parameters():
        info = manifest["tensors"].get(pname)
        if info is None:
            raise CheckpointError(f"{ckpt}: has no tensor {pname}; it was saved from a different model")
        set_param(param, sharding.shard(tensor(info["file"], pname), param))
        if not weights_only:
            for key in MOMENTS:
                set_moment(engine, param, key, sharding.shard(tensor(info["optim_file"], f"{pname}.{key}"), param))
    if not weights_only:
        set_optimizer_step(engine, manifest["optimizer_step"])
        if manifest["layout"].get("world_size") == dist.get_world_size():
            rng = tensor(f"rng-{dist.get_rank():05d}.safetensors", "torch_cpu")
            torch.set_rng_state(rng)
    return manifest


def read_full_tensors(ckpt: Path, moments: bool = False):
    """Yield (name, full tensor) from a checkpoint without any process group (for tools)."""
    manifest = read_manifest(ckpt)
    verify_files(ckpt, manifest)
    for name, info in manifest["tensors"].items():
        with safe_open(str(ckpt / info["file"]), framework="pt") as f:
            yield name, f.get_tensor(name)
        if moments:
            with safe_open(str(ckpt / info["optim_file"]), framework="pt") as f:
                for key in MOMENTS:
                    yield f"{name}.{key}", f.get_tensor(f"{name}.{key}")
