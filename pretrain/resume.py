"""Resume agreement: every rank resumes from the same checkpoint, or none does.

Ranks can see a shared filesystem differently (caches, a file half-written by a dying job). If each
chose on its own, some would enter the collective load and others not, and the job would hang.
So rank 0 alone chooses (`latest`, or the newest older checkpoint that verifies, with one warning
line naming both) and broadcasts its choice or its error; every rank then acts on that one answer.
The load itself checks everything on every rank and agrees on errors before any weight changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pretrain.checkpoint.format import CheckpointError, newest_verified


def agree_on_checkpoint(root: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint under root all ranks resume from (None: start fresh), and the names of the newer
    ones passed over because they do not verify (save keeps them out of keep_last's count). Collective.

    Raises the same CheckpointError on every rank when rank 0 finds checkpoints but none usable.
    """
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            ckpt, warnings, damaged = newest_verified(root)
            answer[0] = {"ckpt": str(ckpt) if ckpt else None, "warnings": warnings, "damaged": damaged, "error": None}
        except CheckpointError as err:
            answer[0] = {"ckpt": None, "warnings": [], "damaged": [], "error": str(err)}
        for line in answer[0]["warnings"]:
            print(line, flush=True)
    dist.broadcast_object_list(answer, src=0)
    if answer[0]["error"]:
        raise CheckpointError(answer[0]["error"])
    return (Path(answer[0]["ckpt"]) if answer[0]["ckpt"] else None), answer[0]["damaged"]


def agree_on_saved_checkpoints(root: Path) -> list[str]:
    """The complete checkpoints under root as rank 0 sees them, on every rank. Collective."""
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        answer[0] = sorted(p.name for p in root.glob("step_*") if (p / "manifest.json").exists())
    dist.broadcast_object_list(answer, src=0)
    return answer[0]


def trim_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Drop metrics.jsonl records after `step` (and a line cut off by a crash), so that after a
    restart or a rollback each step appears once, as the run that went on saw it. Rank 0 only."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


_NOT_THE_RUN = {"checkpoint.resume"}
"""Keys that say how a run is started, not which run it is (with launcher.*)."""


def another_runs_history(run_dir: str | os.PathLike, config: dict[str, Any]) -> str | None:
    """Why starting afresh in run_dir would erase another run's history, or None.

    A fresh start drops metrics.jsonl's records (they belong to steps about to be redone), which is
    right when the same run restarts before its first checkpoint and wrong when run.dir holds a
    different run: its config.yaml, written at its start, tells the two apart."""
    import yaml

    metrics, saved = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "config.yaml"
    if not metrics.is_file() or not saved.is_file() or not metrics.read_text(errors="replace").strip():
        return None
    try:
        before = _flat(yaml.safe_load(saved.read_text()))
    except yaml.YAMLError:
        return None
    now = _flat(config)
    changed = sorted(k for k in (before.keys() | now.keys()) - _NOT_THE_RUN
                     if before.get(k) != now.get(k) and not k.startswith("launcher."))
    if not changed:
        return None
    shown = ", ".join(f"{k}={before.get(k)} (now {now.get(k)})" for k in changed[:3])
    return (f"config error: run.dir {run_dir} holds the metrics of another run with no checkpoint to resume "
            f"({shown}{', ...' if len(changed) > 3 else ''}); starting over would erase them: use another "
            f"run.dir, or checkpoint.resume=false to start over there")
