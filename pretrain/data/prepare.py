"""Tokenize raw text into a dataset directory (shards + tokenizer + manifest), atomically.

Everything is written into a temporary sibling directory that is renamed into place only when
complete, so a crash never leaves a half-written dataset and an existing one is never touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from pretrain.data.manifest import Manifest, TokenizerInfo, dtype_for_vocab, write_manifest
from pretrain.data.shards import ShardWriter
from pretrain.data.text import is_validation, iter_documents
from pretrain.data.tokenizer import TOKENIZER_FILE, eos_id, load_tokenizer
from pretrain.files import atomic_directory

DEFAULT_TOKENS_PER_SHARD = 1 << 24


def encode_documents(tokenizer: Tokenizer, texts: list[str], eos: int, dtype: np.dtype) -> list[np.ndarray]:
    """Tokenize a batch of texts (in parallel, inside tokenizers) and append EOS to each."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.array(e.ids + [eos], dtype=dtype) for e in encodings]


def _batched(items: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_dataset(
    documents: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    val_fraction: float,
    tokens_per_shard: int,
    val_tokens_per_shard: int | None = None,
    metadata: dict | None = None,
    batch_docs: int = 512,
) -> Path:
    """Tokenize (doc_id, text) pairs into train/val shards plus tokenizer and manifest at ``out_dir``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    eos = eos_id(tokenizer)
    vocab = tokenizer.get_vocab_size()
    dtype = dtype_for_vocab(vocab)
    with atomic_directory(out_dir) as tmp:
        writers = {
            "train": ShardWriter(tmp, "train", tokens_per_shard, dtype),
            "val": ShardWriter(tmp, "val", val_tokens_per_shard or tokens_per_shard, dtype),
        }
        for batch in _batched(documents, batch_docs):
            arrays = encode_documents(tokenizer, [text for _, text in batch], eos, dtype)
            for (doc_id, _), arr in zip(batch, arrays):
                writers["val" if is_validation(doc_id, val_fraction) else "train"].add(arr)
        splits = {name: w.close() for name, w in writers.items()}
        if not splits["train"]:
            raise ValueError("no training documents: the inputs are empty or all went to validation")
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        write_manifest(
            tmp,
            Manifest(
                dtype=dtype.name,
                splits=splits,
                tokenizer=TokenizerInfo(TOKENIZER_FILE, vocab, eos),
                metadata={"val_fraction": val_fraction, **(metadata or {})},
            ),
        )
    return Path(out_dir)


def prepare_dataset(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD,
    val_tokens_per_shard: int | None = None,
) -> Path:
    """The library side of tools/prepare_data.py: text/JSONL files or directories → dataset dir."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # fail before tokenizing anything
        raise FileExistsError(
            f"{out} already exists and is not empty; choose a new --out directory "
            f"(existing datasets are never overwritten)"
        )
    tok = load_tokenizer(tokenizer)
    return write_dataset(
        iter_documents(inputs),
        tok,
        out,
        val_fraction,
        tokens_per_shard,
        val_tokens_per_shard,
        metadata={"inputs": [str(i) for i in inputs]},
    )
