"""The dataset manifest: what a directory of token shards contains, so readers can trust it.

A dataset directory holds WebDataset tar shards, an optional ``tokenizer.json`` and
``manifest.json``. The manifest records the format version, token dtype, tokenizer, and for each
split the shards with their document and token counts and sha256, so the reader can assign work
without opening shards and can detect a truncated or altered file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.files import confined

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "pretrain-token-shards"
FORMAT_VERSION = 1
SUPPORTED_DTYPES = ("uint16", "uint32")


_URL_SCHEMES = ("pipe:", "http://", "https://", "file:", "s3://", "gs://")


def is_url(location: str | Path) -> bool:
    """True for anything webdataset opens other than a plain local path."""
    return str(location).startswith(_URL_SCHEMES)


def join_location(location: str | Path, file: str) -> str:
    """Where a manifest entry lives: URLs and absolute paths as they are, others next to the manifest."""
    if is_url(file) or os.path.isabs(file):
        return file
    return f"{str(location).rstrip('/')}/{file}" if is_url(location) else str(Path(location) / file)


def read_location(location: str | Path) -> bytes:
    """The bytes of a local file or of anything webdataset opens (http(s) through curl, pipe: through
    the shell): one reader for every small file a dataset names (manifest, tokenizer)."""
    if not is_url(location):
        return Path(location).expanduser().read_bytes()
    import webdataset as wds

    with wds.gopen(str(location), "rb") as f:
        return f.read()


class DatasetError(ValueError):
    """A dataset is missing, corrupt or incompatible; the message names the file and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: file name (relative to the dataset directory) and its contents."""

    file: str
    documents: int
    tokens: int
    sha256: str


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer the token ids came from."""

    file: str
    vocab_size: int
    eos_id: int
    eos_token: str = "<|endoftext|>"


@dataclass
class Manifest:
    """Everything a reader needs to know about a dataset directory."""

    dtype: str
    splits: dict[str, list[ShardInfo]]
    tokenizer: TokenizerInfo | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def shards(self, split: str) -> list[ShardInfo]:
        """The shards of ``split``; a clear error if the dataset has no such split."""
        if split not in self.splits:
            raise DatasetError(
                f"dataset has no split {split!r} (it has {sorted(self.splits)}); "
                f"choose one of those or re-create the dataset with tools/prepare_data.py"
            )
        return self.splits[split]

    def num_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards(split))


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id (uint16 below 65536)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_manifest(dataset_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file, then rename) so readers never see half of it."""
    path = Path(dataset_dir) / MANIFEST_NAME
    body = {
        "format": FORMAT_NAME,
        "version": manifest.version,
        "dtype": manifest.dtype,
        "tokenizer": asdict(manifest.tokenizer) if manifest.tokenizer else None,
        "splits": {k: [asdict(s) for s in v] for k, v in manifest.splits.items()},
        "metadata": manifest.metadata,
    }
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(dataset_dir: str | Path) -> Manifest:
    """Read and validate ``manifest.json`` (a directory, or a URL webdataset can open); raise DatasetError naming the file if it is unusable."""
    path = join_location(dataset_dir, MANIFEST_NAME)
    fix = "re-create the dataset with tools/prepare_data.py (or delete the directory to rebuild the embedded corpus)"
    if not is_url(dataset_dir) and not Path(path).is_file():
        raise DatasetError(f"{path}: manifest not found; is {dataset_dir} a dataset directory? {fix}")
    try:
        body = json.loads(read_location(join_location(dataset_dir, MANIFEST_NAME)))
    except OSError as e:
        raise DatasetError(f"{path}: manifest cannot be read ({e}); check the location") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: manifest is not valid JSON ({e}); {fix}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: not a {FORMAT_NAME} manifest; {fix}")
    if body.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: unknown manifest version {body.get('version')!r} (this code reads version "
            f"{FORMAT_VERSION}); upgrade pretrain or {fix}"
        )
    try:
        dtype = body["dtype"]
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {SUPPORTED_DTYPES}")
        splits = {
            str(name): [ShardInfo(**s) for s in shards] for name, shards in body["splits"].items()
        }
        for shards in splits.values():
            for s in shards:
                if s.tokens <= 0 or s.documents <= 0:
                    raise ValueError(f"shard {s.file} has no tokens")
                if confined(dataset_dir, s.file) is None:
                    raise ValueError(f"shard file {str(s.file)[:80]!r} is outside {dataset_dir}")
        tok = body.get("tokenizer")
        tokenizer = TokenizerInfo(**tok) if tok else None
        if tokenizer is not None and confined(dataset_dir, tokenizer.file) is None:
            raise ValueError(f"tokenizer file {str(tokenizer.file)[:80]!r} is outside {dataset_dir}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetError(f"{path}: manifest is malformed ({e}); {fix}") from None
    return Manifest(
        dtype=dtype, splits=splits, tokenizer=tokenizer, metadata=body.get("metadata") or {}
    )
