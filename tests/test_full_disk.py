"""A full disk during a checkpoint save: one clear line, and the previous checkpoint stays usable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HUNG, TINY
from pretrain.checkpoint import latest_checkpoint, read_manifest
from pretrain.checkpoint.format import verify_files

REPO = Path(__file__).resolve().parent.parent


def mount_tmpfs(where: Path, size: str):
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs: room for one tiny-model checkpoint (~2.7 MB) but not two."""
    mount = tmp_path / "disk"
    mount_tmpfs(mount, "4m")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_during_save_keeps_the_previous_checkpoint(small_disk: Path) -> None:
    run_dir = small_disk / "run"
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", *TINY, "train.max_steps=4", "checkpoint.interval=2",
                           "checkpoint.keep_last=0", f"run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=HUNG)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("saving checkpoint")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "No space left on device" in errors[0] and "previous checkpoint" in errors[0]

    ckpts = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpts)
    assert latest is not None and latest.name == "step_00000002"
    verify_files(latest, read_manifest(latest))  # complete and uncorrupted
    assert not (ckpts / "step_00000004").exists()
    assert not list(ckpts.glob(".tmp-*"))  # the partial save was removed, freeing the space


def test_hf_export_to_a_full_disk_fails_cleanly(small_disk: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trained = subprocess.run([sys.executable, "-m", "pretrain.train", *TINY, "train.max_steps=1", f"run.dir={run_dir}"],
                             cwd=REPO, capture_output=True, text=True, timeout=HUNG)
    assert trained.returncode == 0, trained.stderr[-2000:]
    (small_disk / "filler").write_bytes(b"\0" * (4 * 1024 * 1024 - 256 * 1024))  # leave 256 KiB free
    out = small_disk / "hf"
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "to-hf", str(run_dir), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=HUNG)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr[-2000:]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no partial export left behind
    verify_files(latest_checkpoint(run_dir / "checkpoints"), read_manifest(latest_checkpoint(run_dir / "checkpoints")))
