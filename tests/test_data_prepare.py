"""tools/prepare_data.py at scale: every input format, the same bytes for any worker count,
resume after an interruption, and a val split that is never empty."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import DatasetError, read_manifest, train_tokenizer
from pretrain.data.prepare import PROGRESS_FILE, prepare_dataset, write_dataset
from pretrain.data.text import iter_documents
from tests.test_data import shard_tokens

TEXTS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 7) for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(TEXTS, 300).save(str(path))
    return path


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_every_input_format_gives_the_same_documents(tmp_path: Path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [{"body": t} for t in TEXTS[:30]]
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"body": [r["body"] for r in rows]}), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "hf"):
        docs = list(iter_documents([tmp_path / name], text_field="body"))
        assert [t for _, t in docs] == TEXTS[:30], name
        assert len({i for i, _ in docs}) == 30
    with pytest.raises(DatasetError, match=r"d\.parquet: no column 'text'.*--text-field"):
        list(iter_documents([tmp_path / "d.parquet"]))
    with pytest.raises(DatasetError, match=r"a\.jsonl:1: expected a JSON object with a string 'text' field"):
        list(iter_documents([tmp_path / "a.jsonl"]))


def test_output_is_byte_identical_for_any_worker_count(tmp_path: Path, tokenizer: Path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    outs = [prepare_dataset([tmp_path / "in"], tokenizer, tmp_path / f"w{w}", val_fraction=0.1,
                            tokens_per_shard=400, workers=w) for w in (1, 2)]
    assert _files(outs[0]) == _files(outs[1])
    assert len(read_manifest(outs[0]).splits["train"]) > 3


def test_interrupted_run_keeps_finished_shards_and_matches_an_uninterrupted_one(tmp_path: Path, tokenizer: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    docs = [(f"d{i}", t) for i, t in enumerate(TEXTS)]
    reference = write_dataset(docs, tok, tmp_path / "ref", 0.1, 300, min_val_shards=2, batch_docs=16)

    def interrupted():
        for i, d in enumerate(docs):
            if i == 80:
                raise KeyboardInterrupt
            yield d

    with pytest.raises(KeyboardInterrupt):
        write_dataset(interrupted(), tok, tmp_path / "out", 0.1, 300, min_val_shards=2, batch_docs=16)
    partial = tmp_path / ".out.partial"
    kept = json.loads((partial / PROGRESS_FILE).read_text())["splits"]["train"]["shards"]
    assert len(kept) >= 3
    stamps = {s["file"]: (partial / s["file"]).stat().st_mtime_ns for s in kept}
    out = write_dataset(docs, tok, tmp_path / "out", 0.1, 300, min_val_shards=2, batch_docs=16)
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == stamps  # finished shards were kept, not rewritten
    assert _files(out) == _files(reference) and not partial.exists()


def test_val_split_is_never_empty_and_has_min_val_shards(tmp_path: Path, tokenizer: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    docs = [(f"d{i}", t) for i, t in enumerate(TEXTS)]
    # a fraction so small that no document hashes into val
    out = write_dataset(docs, tok, tmp_path / "ds", 1e-9, 300, min_val_shards=4)
    m = read_manifest(out)
    assert len(m.splits["val"]) >= 4
    val = [d for s in m.splits["val"] for d in shard_tokens(out, s.file)]
    train = [d for s in m.splits["train"] for d in shard_tokens(out, s.file)]
    assert len(val) + len(train) == len(TEXTS) and val
    with pytest.raises(DatasetError, match="--min-val-shards"):
        write_dataset(docs[:3], tok, tmp_path / "tiny", 0.5, 300, min_val_shards=5)


def test_a_run_that_fails_before_its_first_shard_leaves_nothing_behind(tmp_path: Path, tokenizer: Path):
    from tokenizers import Tokenizer

    def unreadable():
        yield "d0", TEXTS[0]
        raise DatasetError("notes/d1.bin: not UTF-8 text")

    with pytest.raises(DatasetError, match="not UTF-8"):
        write_dataset(unreadable(), Tokenizer.from_file(str(tokenizer)), tmp_path / "out", 0.1, 10_000)
    with pytest.raises(ValueError, match="no training documents"):
        write_dataset(iter([]), Tokenizer.from_file(str(tokenizer)), tmp_path / "out", 0.0, 10_000)
    assert list(tmp_path.iterdir()) == []  # no .out.partial: there was nothing to resume


def test_megatron_indexed_dataset_is_imported_document_for_document(tmp_path: Path, tokenizer: Path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    docs = [tok.encode(t).ids for t in TEXTS[:40]]
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for ids in docs:  # as Megatron's preprocess_data writes them, with the end-of-document token
        builder.add_document(torch.tensor(ids + [0]), [len(ids) + 1])
    builder.finalize(f"{prefix}.idx")

    import subprocess
    import sys
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(repo / "tools" / "prepare_data.py"), "--from-megatron", prefix,
                           "--tokenizer", str(tokenizer), "--out", str(tmp_path / "ds"), "--val-fraction", "0.1",
                           "--tokens-per-shard", "300", "--min-val-shards", "2"],
                          capture_output=True, text=True, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr  # megatron-core's import-time warnings stay quiet
    m = read_manifest(tmp_path / "ds")
    read = [d.tolist() for split in ("train", "val") for s in m.splits[split] for d in shard_tokens(tmp_path / "ds", s.file)]
    assert sorted(read) == sorted(ids + [0] for ids in docs) and len(m.splits["val"]) >= 2
