"""WebDataset token shards: one tar per shard, one ``<key>.npy`` member per document.

Shards are written with webdataset's TarWriter and read through webdataset's ``gopen``, so a shard
can be a local path, a ``pipe:`` command (``pipe:aws s3 cp s3://bucket/train-000001.tar -``) or an
http(s) URL. Members get fixed metadata (mtime 0, uid 0) so the same documents always produce
byte-identical shards and checksums.
"""

from __future__ import annotations

import io
import queue
import re
import tarfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from pretrain.data.manifest import DatasetError, ShardInfo, is_url
from pretrain.files import sha256_file

_REBUILD = "re-create the dataset with tools/prepare_data.py (embedded corpus: delete its directory to rebuild)"
class ShardWriter:
    """Writes documents into successive shards ``{split}-00000.tar``, ... of about ``tokens_per_shard``.

    A shard is closed once it holds at least ``tokens_per_shard`` tokens; documents are never split,
    so every shard starts at a document start (the reader relies on this for position ids).
    """

    def __init__(self, out_dir: Path, split: str, tokens_per_shard: int, dtype: np.dtype | str,
                 first_shard: int = 0, first_key: int = 0):
        if tokens_per_shard < 1:
            raise ValueError(f"tokens_per_shard must be >= 1, got {tokens_per_shard}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.tokens_per_shard = tokens_per_shard
        self.dtype = np.dtype(dtype)
        self.shards: list[ShardInfo] = []
        self._first = first_shard
        self._file: IO[bytes] | None = None
        self._tar: wds.TarWriter | None = None
        self._path: Path | None = None
        self._docs = 0
        self._tokens = 0
        self._next_key = first_key  # documents numbered across the split (continued on resume)

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
        assert self._tar is not None
        self._tar.write({"__key__": f"{self.split}-{self._next_key:010d}", "npy": buf.getvalue()})
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
        self._path = self.out_dir / f"{self.split}-{self._first + len(self.shards):05d}.tar"
        self._file = open(self._path, "wb")
        # Fixed owner, mode and mtime: the same documents give the same bytes.
        self._tar = wds.TarWriter(self._file, user="", group="", mode=0o644, mtime=0, encoder=False)

    def _close_shard(self) -> None:
        assert self._tar is not None and self._path is not None and self._file is not None
        self._tar.close()
        self._file.close()
        self.shards.append(ShardInfo(self._path.name, self._docs, self._tokens, sha256_file(self._path)))
        self._tar, self._file, self._path, self._docs, self._tokens = None, None, None, 0, 0


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


@dataclass(frozen=True)
class ReadOptions:
    """How shards are read: what to accept, how long to wait, how often to retry a URL."""

    dtype: str | None = None  # the manifest's token dtype; None accepts uint16 and uint32
    vocab_size: int | None = None  # token ids must be below this
    timeout: float = 300.0  # seconds without a byte before a read counts as stalled
    retries: int = 3  # further attempts after a failed URL read
    backoff: float = 1.0  # seconds before the first retry; doubles each time


class _TimedStream(io.RawIOBase):
    """A read stream fed by a background thread, so a stalled source raises instead of hanging."""

    def __init__(self, raw: IO[bytes], url: str, timeout: float, chunk: int = 1 << 20):
        self._raw, self._url, self._timeout = raw, url, timeout
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._buffer, self._offset, self._eof = b"", 0, False
        threading.Thread(target=self._pump, args=(chunk,), daemon=True).start()

    def _pump(self, chunk: int) -> None:
        try:
            while True:
                data = self._raw.read(chunk)
                self._queue.put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the reader
            self._queue.put(e)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._offset == len(self._buffer):
            if self._eof:
                return 0
            try:
                item = self._queue.get(timeout=self._timeout)
            except queue.Empty:
                self.abort()
                raise TimeoutError(f"no data for {self._timeout:g}s (data.timeout)") from None
            if isinstance(item, BaseException):
                raise item
            if not item:
                self._eof = True
                return 0
            self._buffer, self._offset = item, 0
        n = min(len(b), len(self._buffer) - self._offset)
        b[:n] = self._buffer[self._offset : self._offset + n]
        self._offset += n
        return n

    def abort(self) -> None:
        proc = getattr(self._raw, "proc", None)  # webdataset's Pipe (pipe:, http via curl)
        if proc is not None:
            proc.kill()

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()
            except Exception:
                pass  # a failing source was already reported by read()
        super().close()


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][a-z]\d+)', 'fortran_order': False, 'shape': \((\d+),?\), \}\s*")


def _load_npy(data: bytes) -> np.ndarray:
    """A .npy member as an array. numpy's own header parser (ast.literal_eval) costs more than the
    data for short documents, so the one header layout our writer produces is parsed directly;
    anything else goes through np.load (never with pickle)."""
    if data[:8] in (b"\x93NUMPY\x01\x00",) and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.fullmatch(data[10:end])
        if match:
            dtype, count = np.dtype(match.group(1).decode()), int(match.group(2))
            if len(data) - end == count * dtype.itemsize:
                return np.frombuffer(data, dtype, count, offset=end)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode(url: str, name: str, data: bytes, opts: ReadOptions) -> np.ndarray:
    arr = _load_npy(data)
    allowed = (opts.dtype,) if opts.dtype else ("uint16", "uint32")
    if arr.dtype.name not in allowed or arr.ndim != 1:
        raise DatasetError(f"{url}: member {name} holds {arr.dtype.name} of shape {arr.shape}, expected a 1-D "
                           f"{' or '.join(allowed)} token array; {_REBUILD}")
    if opts.vocab_size is not None and arr.size and int(arr.max()) >= opts.vocab_size:
        raise DatasetError(f"{url}: member {name} has token id {int(arr.max())} >= vocabulary size "
                           f"{opts.vocab_size}: the shard is corrupt or was tokenized with another tokenizer; {_REBUILD}")
    return arr


def _read_once(url: str, opts: ReadOptions) -> list[np.ndarray]:
    raw = wds.gopen(url, "rb")
    stream = _TimedStream(raw, url, opts.timeout)
    try:
        docs = []
        try:
            for member in tar_file_iterator(io.BufferedReader(stream, 1 << 20)):
                if member["fname"].endswith(".npy"):
                    docs.append(_decode(url, member["fname"], member["data"], opts))
        except (tarfile.TarError, EOFError):
            proc = getattr(raw, "proc", None)  # a failed download or command ends its stream early
            if proc is not None and proc.wait(timeout=opts.timeout) not in (0, 141):
                raise OSError(f"{proc.args if isinstance(proc.args, str) else proc.args[0]} exited with status "
                              f"{proc.returncode}") from None
            raise
        return docs
    finally:
        stream.close()


def _strip(e: BaseException) -> str:
    """The message without the `` @ <stream>`` webdataset's tar iterator appends."""
    return str(e.args[0] if e.args else e).split(" @ <")[0]


def read_shard(url: str, shard: ShardInfo | None, opts: ReadOptions = ReadOptions()) -> list[np.ndarray]:
    """All documents of one shard, in order; a DatasetError naming ``url`` if it cannot be read.

    URLs (pipe:, http...) are retried ``opts.retries`` times with exponential backoff; a local
    file is not (a missing or truncated file does not heal). A shard whose documents or tokens
    differ from the manifest (a truncated file can end cleanly on a member boundary) is an error.
    """
    attempts = 1 + (opts.retries if is_url(url) else 0)
    for attempt in range(attempts):
        try:
            docs = _read_once(url, opts)
            break
        except DatasetError as e:
            raise DatasetError(_strip(e)) from None
        except FileNotFoundError:
            raise DatasetError(f"{url}: shard file is missing; {_REBUILD}") from None
        except TimeoutError as e:
            raise DatasetError(f"{url}: read stalled: {e}; raise data.timeout if the store is slow") from None
        except (tarfile.TarError, EOFError, ValueError) as e:
            raise DatasetError(f"{url}: corrupt shard ({_strip(e)}); {_REBUILD}") from None
        except OSError as e:
            if attempt + 1 == attempts:
                what = f"unreachable after {attempts} attempts" if attempts > 1 else "unreadable"
                raise DatasetError(f"{url}: {what} ({_strip(e)}); check the URL and the network, "
                                   f"or set data.on_bad_shard=skip to go on without it") from None
            time.sleep(opts.backoff * 2**attempt)
    if shard is not None and shard.documents and (len(docs), sum(d.size for d in docs)) != (shard.documents, shard.tokens):
        raise DatasetError(
            f"{url}: corrupt shard (read {len(docs)} documents / {sum(d.size for d in docs)} tokens, manifest says "
            f"{shard.documents} / {shard.tokens}; truncated?); {_REBUILD}"
        )
    return docs
