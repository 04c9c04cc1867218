"""The default corpus, built on the fly from text every Python installation ships.

The standard library's ``.py`` sources (without its test suites and IDLE) and the pydoc topic
texts give ~11 MB of code and English prose: enough to train a small model end to end with no
download. The build is cached per (format version, Python version, vocab size) and guarded by a
file lock so concurrent workers build it once.
"""

from __future__ import annotations

import fcntl
import os
import sys
import sysconfig
from pathlib import Path

from pretrain.data.manifest import MANIFEST_NAME, Manifest, TokenizerInfo, dtype_for_vocab, read_manifest, write_manifest
from pretrain.data.prepare import encode_documents, shard_size_for
from pretrain.files import atomic_directory
from pretrain.data.shards import write_token_shards
from pretrain.data.text import is_validation
from pretrain.data.tokenizer import TOKENIZER_FILE, eos_id, train_tokenizer

EMBEDDED_VERSION = 1
VAL_FRACTION = 0.02
MAX_TOKENS_PER_SHARD = 1 << 18  # ~256k tokens: the full corpus gives 16+ train shards
MIN_TRAIN_SHARDS = 16  # several shards per DP rank even at dp_size 8
MIN_VAL_SHARDS = 8  # evaluation runs on every DP rank too
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib-dynload", "turtledemo"}


def stdlib_documents(max_files: int | None = None) -> list[tuple[str, str]]:
    """(doc_id, text) for the stdlib sources and pydoc topics, sorted by id.

    ``max_files`` keeps an evenly spaced subset of the source files (for fast tests).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                if rel != "pydoc_data/topics.py":  # its text is added below as prose
                    files.append((rel, path))
    files.sort()
    if max_files is not None and max_files < len(files):
        step = len(files) / max_files
        files = [files[int(i * step)] for i in range(max_files)]
    docs: list[tuple[str, str]] = []
    for rel, path in files:
        try:
            docs.append((rel, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are deliberately not UTF-8
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip the docs
        topics = {}
    docs.extend((f"pydoc_data/topics/{key}", text) for key, text in sorted(topics.items()) if text)
    return sorted(d for d in docs if d[1])


def embedded_corpus_name(vocab_size: int, max_files: int | None = None) -> str:
    """Cache directory name: changes whenever the content would."""
    name = f"embedded-v{EMBEDDED_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-vocab{vocab_size}"
    return name if max_files is None else f"{name}-files{max_files}"


def prepare_embedded_corpus(cache_dir: str | Path, vocab_size: int = 8192, *, max_files: int | None = None) -> Path:
    """Build (once) and return the dataset directory of the embedded default corpus.

    Safe to call from many processes at once: the first builds under an exclusive file lock,
    the others wait on the lock and then reuse the result.
    """
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    name = embedded_corpus_name(vocab_size, max_files)
    out = cache / name
    if not (out / MANIFEST_NAME).is_file():
        with open(cache / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (out / MANIFEST_NAME).is_file():
                _build(out, vocab_size, max_files)
    read_manifest(out)  # a damaged cache fails here, naming the file
    return out


def _build(out: Path, vocab_size: int, max_files: int | None) -> None:
    docs = stdlib_documents(max_files)
    val_mask = [is_validation(doc_id, VAL_FRACTION) for doc_id, _ in docs]
    tokenizer = train_tokenizer((text for (_, text), v in zip(docs, val_mask) if not v), vocab_size)
    eos = eos_id(tokenizer)
    dtype = dtype_for_vocab(tokenizer.get_vocab_size())
    arrays = encode_documents(tokenizer, [text for _, text in docs], eos, dtype)
    train = [a for a, v in zip(arrays, val_mask) if not v]
    val = [a for a, v in zip(arrays, val_mask) if v]
    with atomic_directory(out) as tmp:
        splits = {
            "train": write_token_shards(train, tmp, "train", shard_size_for(train, MIN_TRAIN_SHARDS, MAX_TOKENS_PER_SHARD), dtype),
            "val": write_token_shards(val, tmp, "val", shard_size_for(val, MIN_VAL_SHARDS, MAX_TOKENS_PER_SHARD), dtype),
        }
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        write_manifest(
            tmp,
            Manifest(
                dtype=dtype.name,
                splits=splits,
                tokenizer=TokenizerInfo(TOKENIZER_FILE, tokenizer.get_vocab_size(), eos),
                metadata={
                    "source": "python-stdlib",
                    "python": sys.version.split()[0],
                    "documents": {"train": len(train), "val": len(val)},
                    "val_fraction": VAL_FRACTION,
                },
            ),
        )
