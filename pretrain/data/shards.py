"""WebDataset token shards: one tar per shard, one ``<key>.npy`` member per document.

The tar layout is WebDataset's (samples grouped by key, one file per field), so the shards can be
inspected with ``tar tf`` or read by any WebDataset pipeline. Members get fixed metadata (mtime 0,
uid 0) so the same documents always produce byte-identical shards and checksums.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pretrain.data.manifest import DatasetError, ShardInfo
from pretrain.files import sha256_file

_REBUILD = "re-create the dataset with tools/prepare_data.py (embedded corpus: delete its directory to rebuild)"


class ShardWriter:
    """Writes documents into successive shards ``{split}-00000.tar``, ... of about ``tokens_per_shard``.

    A shard is closed once it holds at least ``tokens_per_shard`` tokens; documents are never split,
    so every shard starts at a document start (the reader relies on this for position ids).
    """

    def __init__(self, out_dir: Path, split: str, tokens_per_shard: int, dtype: np.dtype | str):
        if tokens_per_shard < 1:
            raise ValueError(f"tokens_per_shard must be >= 1, got {tokens_per_shard}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.tokens_per_shard = tokens_per_shard
        self.dtype = np.dtype(dtype)
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._docs = 0
        self._tokens = 0
        self._next_key = 0

    def add(self, tokens: np.ndarray) -> None:
        """Append one document (a 1-D array of token ids, EOS already appended)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"a document must be a non-empty 1-D token array, got shape {tokens.shape}")
        if tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max:
            raise ValueError(f"token ids out of range for {self.dtype} (max id {tokens.max()})")
        if self._tar is None:
            self._open()
        buf = io.BytesIO()
        np.save(buf, tokens.astype(self.dtype, copy=False), allow_pickle=False)
        info = tarfile.TarInfo(f"{self.split}-{self._next_key:010d}.npy")
        info.size = buf.tell()
        info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
        buf.seek(0)
        assert self._tar is not None
        self._tar.addfile(info, buf)
        self._next_key += 1
        self._docs += 1
        self._tokens += int(tokens.size)
        if self._tokens >= self.tokens_per_shard:
            self._close_shard()

    def close(self) -> list[ShardInfo]:
        """Finish the last shard and return the list of all shards written."""
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def _open(self) -> None:
        self._path = self.out_dir / f"{self.split}-{len(self.shards):05d}.tar"
        self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)

    def _close_shard(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        self.shards.append(ShardInfo(self._path.name, self._docs, self._tokens, sha256_file(self._path)))
        self._tar, self._path, self._docs, self._tokens = None, None, 0, 0


def write_token_shards(
    documents: Iterable[np.ndarray],
    out_dir: Path,
    split: str,
    tokens_per_shard: int,
    dtype: np.dtype | str,
) -> list[ShardInfo]:
    """Write ``documents`` (token arrays, EOS included) as shards of ``split`` into ``out_dir``."""
    writer = ShardWriter(Path(out_dir), split, tokens_per_shard, dtype)
    for doc in documents:
        writer.add(doc)
    return writer.close()


def verify_shard(path: Path, shard: ShardInfo) -> None:
    """Raise DatasetError naming ``path`` if it is missing or its sha256 differs from the manifest."""
    if not path.is_file():
        raise DatasetError(f"{path}: shard file is missing; {_REBUILD}")
    digest = sha256_file(path)
    if digest != shard.sha256:
        raise DatasetError(
            f"{path}: checksum mismatch (sha256 {digest[:12]}..., manifest says {shard.sha256[:12]}...); {_REBUILD}"
        )


def iter_shard_documents(path: Path, shard: ShardInfo) -> Iterator[np.ndarray]:
    """Stream the documents of one shard in order, one tar member at a time.

    Any read error, and a shard whose documents or tokens differ from the manifest (a truncated
    file can end cleanly on a member boundary), raises DatasetError naming the file.
    """
    docs = tokens = 0
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".npy"):
                    continue
                fobj = tar.extractfile(member)
                assert fobj is not None
                data = fobj.read()
                if len(data) != member.size:
                    raise EOFError(f"member {member.name} is truncated")
                arr = np.load(io.BytesIO(data), allow_pickle=False)
                if arr.ndim != 1:
                    raise ValueError(f"member {member.name} is not a 1-D token array")
                docs += 1
                tokens += arr.size
                yield arr
    except FileNotFoundError:
        raise DatasetError(f"{path}: shard file is missing; {_REBUILD}") from None
    except (tarfile.TarError, EOFError, ValueError, OSError) as e:
        raise DatasetError(f"{path}: corrupt shard ({e}); {_REBUILD}") from None
    if docs != shard.documents or tokens != shard.tokens:
        raise DatasetError(
            f"{path}: corrupt shard (read {docs} documents / {tokens} tokens, manifest says "
            f"{shard.documents} / {shard.tokens}; truncated?); {_REBUILD}"
        )
