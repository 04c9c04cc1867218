"""Raw-text documents for the tools: text files (one document each) and JSONL (one per line).

Each document carries a stable id (its path relative to the input root, plus the line number for
JSONL) so the train/validation split depends only on what a document is, not on input order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from pretrain.data.manifest import DatasetError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Stable split: a document is held out iff the hash of its id falls below ``val_fraction``."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / float(1 << 64) < val_fraction


def list_input_files(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """Expand files and directories into (path, id-prefix) pairs, sorted for determinism.

    Directories are walked recursively for files ending in TEXT_SUFFIXES; hidden entries skipped.
    """
    found: list[tuple[Path, str]] = []
    for raw in inputs:
        root = Path(raw)
        if root.is_file():
            found.append((root, root.name))
        elif root.is_dir():
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root)
                if p.is_file() and p.suffix in TEXT_SUFFIXES and not any(part.startswith(".") for part in rel.parts):
                    found.append((p, f"{root.name}/{rel.as_posix()}"))
        else:
            raise DatasetError(f"{root}: input not found; pass existing text/.jsonl files or directories")
    if not found:
        raise DatasetError(f"no input files found in {[str(i) for i in inputs]}; accepted suffixes: {TEXT_SUFFIXES}")
    return found


def iter_documents(inputs: Sequence[str | Path]) -> Iterator[tuple[str, str]]:
    """Yield (doc_id, text) for every document in ``inputs``; empty documents are skipped."""
    for path, prefix in list_input_files(inputs):
        if path.suffix == ".jsonl":
            yield from _iter_jsonl(path, prefix)
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: not UTF-8 text; convert it or leave it out of --input") from None
        if text:
            yield prefix, text


def _iter_jsonl(path: Path, prefix: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if not isinstance(text, str):
                    raise TypeError("'text' is not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(
                    f"{path}:{lineno}: expected a JSON object with a string 'text' field ({e}); fix or remove the line"
                ) from None
            if text:
                yield f"{prefix}:{lineno}", text
