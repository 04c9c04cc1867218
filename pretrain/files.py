"""File helpers shared by the dataset and checkpoint writers."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks (checkpoint shards can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory that becomes ``out_dir`` on success and vanishes on failure.

    Refuses up front if ``out_dir`` exists and is not empty; rename(2) refuses too if it became
    non-empty meanwhile, so existing data (a dataset, an export) is never overwritten.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new output directory "
                              "(existing data is never overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def confined(root: str | Path, name: object) -> Path | None:
    """``root / name`` if ``name`` (read from a file: a pointer, a manifest, an index) is a plain
    relative path that stays inside ``root``, else None.

    A manifest must not be able to make a reader open /etc/passwd or ../../other-run/...: absolute
    names, ``..`` and symlinks leading out of ``root`` are refused. Callers raise their own error.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        return None
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    base = Path(root).resolve()
    path = (base / relative).resolve()
    return Path(root) / relative if path == base or base in path.parents else None
