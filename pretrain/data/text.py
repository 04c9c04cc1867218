"""Raw-text documents for the tools: text files, JSONL (plain, .gz, .zst), parquet, and Hugging Face
``datasets`` directories saved with ``save_to_disk``.

Each document carries a stable id (its path relative to the input root, plus the line or row
number) so the train/validation split depends only on what a document is, not on input order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from pretrain.data.manifest import DatasetError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_INSTALL = 'install it with `pip install -e ".[data]"`'


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Stable split: a document is held out iff the hash of its id falls below ``val_fraction``."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / float(1 << 64) < val_fraction


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def list_input_files(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """Expand files and directories into (path, id-prefix) pairs, sorted for determinism.

    Directories are walked recursively for files ending in TEXT_SUFFIXES; hidden entries skipped.
    A directory written by ``datasets.Dataset.save_to_disk`` is one input.
    """
    found: list[tuple[Path, str]] = []
    for raw in inputs:
        root = Path(raw)
        if root.is_file() or _is_hf_dataset(root):
            found.append((root, root.name))
        elif root.is_dir():
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root)
                if p.is_file() and p.name.endswith(TEXT_SUFFIXES) and not any(part.startswith(".") for part in rel.parts):
                    found.append((p, f"{root.name}/{rel.as_posix()}"))
        else:
            raise DatasetError(f"{root}: input not found; pass existing text/.jsonl files or directories")
    if not found:
        raise DatasetError(f"no input files found in {[str(i) for i in inputs]}; accepted suffixes: {TEXT_SUFFIXES}")
    return found


def input_bytes(inputs: Sequence[str | Path]) -> int:
    """Total size on disk of the inputs (the progress bar's ETA is measured against it)."""
    total = 0
    for path, _ in list_input_files(inputs):
        files = path.rglob("*") if path.is_dir() else [path]
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total


def iter_documents(inputs: Sequence[str | Path], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield (doc_id, text) for every document in ``inputs``; empty documents are skipped."""
    for path, prefix in list_input_files(inputs):
        if path.is_dir():
            yield from _iter_hf(path, prefix, text_field)
        elif path.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
            yield from _iter_jsonl(path, prefix, text_field)
        elif path.suffix == ".parquet":
            yield from _iter_parquet(path, prefix, text_field)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DatasetError(f"{path}: not UTF-8 text; convert it or leave it out of --input") from None
            if text:
                yield prefix, text


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DatasetError(f"{path}: reading .zst needs the zstandard package; {_INSTALL}") from None
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_jsonl(path: Path, prefix: str, field: str) -> Iterator[tuple[str, str]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
                if not isinstance(text, str):
                    raise TypeError(f"{field!r} is not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(
                    f"{path}:{lineno}: expected a JSON object with a string {field!r} field ({e}); "
                    f"fix or remove the line, or name the field with --text-field"
                ) from None
            if text:
                yield f"{prefix}:{lineno}", text


def _iter_parquet(path: Path, prefix: str, field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading parquet needs the pyarrow package; {_INSTALL}") from None
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise DatasetError(f"{path}: no column {field!r} (columns: {table.schema_arrow.names}); name it with --text-field")
    row = 0
    for batch in table.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text:
                yield f"{prefix}:{row}", text
            row += 1


def _iter_hf(path: Path, prefix: str, field: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{path}: reading a saved Hugging Face dataset needs the datasets package; {_INSTALL}") from None
    loaded = datasets.load_from_disk(str(path))
    parts = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, ds in parts:
        if field not in ds.column_names:
            raise DatasetError(f"{path}: no column {field!r} (columns: {ds.column_names}); name it with --text-field")
        name = f"{prefix}/{split}" if split else prefix
        for row, text in enumerate(ds[field] if len(ds) < 100_000 else (r[field] for r in ds)):
            if text:
                yield f"{name}:{row}", text
