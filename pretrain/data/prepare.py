"""Tokenize raw text into a dataset directory (shards + tokenizer + manifest), in parallel and resumably.

Documents are tokenized in fixed batches by ``workers`` processes (``tokenizers`` batch encoding)
and written in input order, so the output is byte-identical for any worker count. Work happens in
``.<out>.partial`` next to the output: every closed shard is recorded in its ``progress.json``, so
an interrupted run started again keeps the finished shards and continues after them. The
directory is renamed to ``out`` only when complete; an existing dataset is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from pretrain.data.manifest import (MANIFEST_NAME, DatasetError, Manifest, ShardInfo, TokenizerInfo, dtype_for_vocab,
                                    write_manifest)
from pretrain.data.shards import ShardWriter, read_shard
from pretrain.data.text import input_bytes, is_validation, iter_documents
from pretrain.data.tokenizer import TOKENIZER_FILE, eos_id, load_tokenizer
from pretrain.files import fsync_dir

DEFAULT_TOKENS_PER_SHARD = 1 << 24
PROGRESS_FILE = "progress.json"


def encode_documents(tokenizer: Tokenizer, texts: list[str], eos: int, dtype: np.dtype) -> list[np.ndarray]:
    """Tokenize a batch of texts (in parallel, inside tokenizers) and append EOS to each."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.array(e.ids + [eos], dtype=dtype) for e in encodings]


_worker_state: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eos: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _worker_state.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos=eos, dtype=np.dtype(dtype))


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    s = _worker_state
    return encode_documents(s["tokenizer"], texts, s["eos"], s["dtype"])


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Progress:
    """tqdm bar over input bytes (for the ETA), showing documents and tokens/s."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.docs = self.tokens = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", dynamic_ncols=True)

    def update(self, texts: list[str], arrays: list[np.ndarray]) -> None:
        self.docs += len(texts)
        self.tokens += sum(a.size for a in arrays)
        if self._bar is not None:
            elapsed = max(self._bar.format_dict["elapsed"], 1e-9)
            self._bar.set_postfix(docs=f"{self.docs:,}", tokens=f"{self.tokens:,}", tok_s=f"{self.tokens / elapsed:,.0f}",
                                  refresh=False)
            self._bar.update(sum(len(t) if isinstance(t, str) else 2 * t.size for t in texts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def shard_size_for(docs: list[np.ndarray], min_shards: int, max_size: int | None = None) -> int:
    """Largest tokens-per-shard (at most ``max_size``) that gives at least ``min_shards`` shards of ``docs``."""
    def count(size: int) -> int:
        shards, fill = 0, 0
        for d in docs:
            fill += d.size
            if fill >= size:
                shards, fill = shards + 1, 0
        return shards + (fill > 0)

    size = max(1, sum(d.size for d in docs) // min_shards)
    if max_size is not None:
        size = min(max_size, size)
    while size > 1 and count(size) < min_shards:
        size //= 2
    return size


def write_dataset(
    documents: Iterable[tuple[str, str]],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    val_fraction: float,
    tokens_per_shard: int,
    val_tokens_per_shard: int | None = None,
    metadata: dict | None = None,
    batch_docs: int = 256,
    workers: int = 1,
    min_val_shards: int = 1,
    total_bytes: int = 0,
    progress: bool = False,
    pretokenized: bool = False,
) -> Path:
    """Tokenize (doc_id, text) pairs (or take (doc_id, token array) pairs when ``pretokenized``) into train/val shards plus tokenizer and manifest at ``out_dir``.

    With ``val_fraction > 0`` the val split gets at least ``min_val_shards`` shards: if too few
    documents hash into it, the last training documents are moved there.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1 or min_val_shards < 1:
        raise ValueError(f"workers and min_val_shards must be >= 1, got {workers} and {min_val_shards}")
    out = Path(out_dir)
    eos, vocab = eos_id(tokenizer), tokenizer.get_vocab_size()
    dtype = dtype_for_vocab(vocab)
    settings = {"val_fraction": val_fraction, "tokens_per_shard": tokens_per_shard, "dtype": dtype.name,
                "val_tokens_per_shard": val_tokens_per_shard, "batch_docs": batch_docs,
                "min_val_shards": min_val_shards, "tokenizer": tokenizer.to_str(), **(metadata or {})}
    work = out.parent / f".{out.name}.partial"
    with _removed_if_nothing_written(work):
        done = _load_progress(work, settings)
        sizes = {"train": tokens_per_shard, "val": val_tokens_per_shard or tokens_per_shard}
        writers = {k: ShardWriter(work, k, sizes[k], dtype, first_shard=len(done[k]["shards"]),
                                  first_key=sum(s.documents for s in done[k]["shards"])) for k in sizes}
        ends = {k: done[k]["end"] for k in sizes}  # input documents covered by each split's closed shards
        val_docs = done["val"]["documents"]
        holdback: deque[tuple[int, np.ndarray]] = deque()  # the last train documents, in case val needs them
        keep = min_val_shards if val_fraction > 0 else 0
        start = min(ends.values())

        def add(split: str, index: int, arr: np.ndarray) -> None:
            before = len(writers[split].shards)
            writers[split].add(arr)
            if len(writers[split].shards) > before:  # a shard was closed: record it
                ends[split] = index + 1
                _save_progress(work, settings, done, writers, ends)

        if workers == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # --workers 1 means one core
        bar = _Progress(total_bytes, progress)
        pool = (get_context("spawn").Pool(workers, _init_worker, (tokenizer.to_str(), eos, dtype.name))
                if workers > 1 and not pretokenized else None)
        try:
            numbered = ((i, doc) for i, doc in enumerate(documents) if i >= start)
            batches = _batched(numbered, batch_docs)
            texts_of = (lambda b: [t for _, (_, t) in b])
            if pool is not None:
                pending: deque = deque()
                def results() -> Iterator[tuple[list, list[np.ndarray]]]:
                    for batch in batches:
                        pending.append((batch, pool.apply_async(_encode_in_worker, (texts_of(batch),))))
                        if len(pending) > 2 * workers:
                            b, r = pending.popleft()
                            yield b, r.get()
                    while pending:
                        b, r = pending.popleft()
                        yield b, r.get()
                encoded = results()
            elif pretokenized:
                encoded = ((b, [np.asarray(t, dtype=dtype) for t in texts_of(b)]) for b in batches)
            else:
                encoded = ((b, encode_documents(tokenizer, texts_of(b), eos, dtype)) for b in batches)
            for batch, arrays in encoded:
                bar.update(texts_of(batch), arrays)
                for (index, (doc_id, _)), arr in zip(batch, arrays):
                    if is_validation(doc_id, val_fraction):
                        if index >= ends["val"]:
                            add("val", index, arr)
                            val_docs += 1
                    elif index >= ends["train"]:
                        holdback.append((index, arr))
                        if len(holdback) > keep:
                            add("train", *holdback.popleft())
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
        if val_fraction > 0:
            while val_docs < min_val_shards and holdback:
                writers["val"].add(holdback.pop()[1])
                val_docs += 1
            if val_docs < min_val_shards:
                raise DatasetError(f"only {val_docs} validation documents but --min-val-shards is {min_val_shards}; "
                                   "the corpus is too small: add documents or lower --min-val-shards")
        for index, arr in holdback:
            writers["train"].add(arr)
        splits = {k: done[k]["shards"] + w.close() for k, w in writers.items()}
        if not splits["train"]:
            raise ValueError("no training documents: the inputs are empty or all went to validation")
        if val_fraction > 0 and len(splits["val"]) < min_val_shards:
            splits["val"] = _reshard(work, splits["val"], min_val_shards, dtype)
        tokenizer.save(str(work / TOKENIZER_FILE))
        write_manifest(work, Manifest(dtype=dtype.name, splits=splits, tokenizer=TokenizerInfo(TOKENIZER_FILE, vocab, eos),
                                      metadata={"val_fraction": val_fraction, **(metadata or {})}))
        (work / PROGRESS_FILE).unlink(missing_ok=True)
        os.chmod(work, 0o755)
        fsync_dir(work)
        os.rename(work, out)
        return out


def _reshard(work: Path, shards: list[ShardInfo], min_shards: int, dtype: np.dtype) -> list[ShardInfo]:
    """Rewrite a small split into at least ``min_shards`` shards."""
    docs = [d for s in shards for d in read_shard(str(work / s.file), s)]
    for s in shards:
        (work / s.file).unlink()
    name = shards[0].file.rsplit("-", 1)[0]
    writer = ShardWriter(work, name, shard_size_for(docs, min_shards), dtype)
    for d in docs:
        writer.add(d)
    return writer.close()


@contextlib.contextmanager
def _removed_if_nothing_written(work: Path) -> Iterator[None]:
    """A run that fails before it closes its first shard (empty or unreadable input, a wrong tokenizer)
    leaves no work directory behind: there is nothing in it to resume."""
    try:
        yield
    except BaseException:
        if work.is_dir() and not (work / PROGRESS_FILE).exists() and not (work / MANIFEST_NAME).exists():
            shutil.rmtree(work, ignore_errors=True)
        raise


def _load_progress(work: Path, settings: dict) -> dict[str, dict]:
    """Finished shards of an interrupted run with the same settings, or a fresh work directory."""
    empty = {"train": {"shards": [], "end": 0}, "val": {"shards": [], "end": 0, "documents": 0}}
    path = work / PROGRESS_FILE
    if work.exists() and path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] != settings:
            raise DatasetError(f"{work} holds an interrupted run with other inputs or options; delete it to start over")
        done = {k: {**v, "shards": [ShardInfo(**s) for s in v["shards"]]} for k, v in saved["splits"].items()}
        done["val"]["documents"] = sum(s.documents for s in done["val"]["shards"])  # open shards are redone
        keep = {s.file for v in done.values() for s in v["shards"]}
        for p in work.iterdir():  # the shards open when the run stopped are redone
            if p.name not in keep and p.name != PROGRESS_FILE:
                p.unlink()
        print(f"resuming: {sum(len(v['shards']) for v in done.values())} finished shards kept in {work}", flush=True)
        return done
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return empty


def _save_progress(work: Path, settings: dict, done: dict, writers: dict, ends: dict) -> None:
    body = {"settings": settings,
            "splits": {k: {"shards": [asdict(s) for s in done[k]["shards"] + w.shards], "end": ends[k]}
                       for k, w in writers.items()}}
    tmp = work / f".{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, work / PROGRESS_FILE)


def prepare_dataset(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD,
    val_tokens_per_shard: int | None = None,
    workers: int | None = None,
    text_field: str = "text",
    min_val_shards: int = 1,
    progress: bool = False,
) -> Path:
    """The library side of tools/prepare_data.py: text/JSONL/parquet/HF inputs → dataset dir."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # fail before tokenizing anything
        raise FileExistsError(
            f"{out} already exists and is not empty; choose a new --out directory "
            f"(existing datasets are never overwritten)"
        )
    if out.exists():
        out.rmdir()  # an empty directory: the finished dataset is renamed into its place
    tok = load_tokenizer(tokenizer)
    return write_dataset(
        iter_documents(inputs, text_field),
        tok,
        out,
        val_fraction,
        tokens_per_shard,
        val_tokens_per_shard,
        metadata={"inputs": [str(i) for i in inputs], "text_field": text_field},
        workers=workers or os.cpu_count() or 1,
        min_val_shards=min_val_shards,
        total_bytes=input_bytes(inputs) if progress else 0,
        progress=progress,
    )


def megatron_documents(prefix: str, eos: int, vocab: int) -> Iterator[tuple[str, np.ndarray]]:
    """(doc_id, tokens + EOS) of a Megatron-LM / GPT-NeoX indexed dataset (PREFIX.bin + PREFIX.idx),
    read with megatron-core's own IndexedDataset."""
    with warnings.catch_warnings():  # its import warns that optional CUDA extensions are absent; none is used
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        raise DatasetError(f"{prefix}: expected {prefix}.bin and {prefix}.idx (a Megatron indexed dataset prefix)")
    data = IndexedDataset(prefix)
    bounds = data.document_indices
    name = Path(prefix).name
    for i in range(len(bounds) - 1):
        parts = [np.asarray(data[j], dtype=np.int64) for j in range(bounds[i], bounds[i + 1])]
        tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if tokens.size and tokens.max() >= vocab:
            raise DatasetError(f"{prefix}: document {i} has token id {tokens.max()} >= the tokenizer's {vocab}; "
                               f"pass the tokenizer the dataset was made with")
        if tokens.size and tokens[-1] != eos:
            tokens = np.append(tokens, eos)  # documents end with EOS here, as the packer expects
        if tokens.size:
            yield f"{name}:{i}", tokens


def import_megatron(prefix: str, tokenizer: str | Path, out_dir: str | Path, val_fraction: float = 0.01,
                    tokens_per_shard: int = DEFAULT_TOKENS_PER_SHARD, min_val_shards: int = 1) -> Path:
    """The library side of tools/prepare_data.py --from-megatron PREFIX."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out directory "
                              f"(existing datasets are never overwritten)")
    if out.exists():
        out.rmdir()
    tok = load_tokenizer(tokenizer)
    docs = megatron_documents(prefix, eos_id(tok), tok.get_vocab_size())
    return write_dataset(docs, tok, out, val_fraction, tokens_per_shard, metadata={"megatron_prefix": str(prefix)},
                         min_val_shards=min_val_shards, pretokenized=True)
