"""Shards opened through webdataset wherever it opens them (pipe: commands, http URLs), and bad
input: each failure is one error naming the shard or URL, or a counted skip."""

from __future__ import annotations

import functools
import http.server
import io
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pretrain.data import DatasetError, Manifest, ShardInfo, TokenizerInfo, TokenLoader, read_manifest, write_manifest
from pretrain.data.shards import ReadOptions
from tests.test_data import assert_reads_then_resumes, assert_same_batches, make_dataset, take

KW = dict(split="train", seq_len=32, micro_batch_size=2, seed=4)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds", num_shards=6)


def relist(dataset: Path, to_url) -> None:
    """Rewrite the manifest so every shard is named by ``to_url(path)`` instead of its file name."""
    m = read_manifest(dataset)
    splits = {k: [ShardInfo(to_url(dataset / s.file), s.documents, s.tokens, s.sha256) for s in v] for k, v in m.splits.items()}
    write_manifest(dataset, Manifest(m.dtype, splits, m.tokenizer, m.metadata))


@pytest.fixture
def http_root(tmp_path: Path):
    """A local HTTP server on 127.0.0.1 serving tmp_path, stopped after the test."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_shards_read_through_pipe_cat_give_the_same_batches(dataset: Path, tmp_path: Path, dp_rank: int):
    reference = take(iter(TokenLoader(dataset, dp_rank=dp_rank, dp_size=2, **KW)), 40)
    relist(dataset, lambda p: f"pipe:cat {p}")
    assert read_manifest(dataset).splits["train"][0].file.startswith("pipe:cat ")
    assert_same_batches(take(iter(TokenLoader(dataset, dp_rank=dp_rank, dp_size=2, **KW)), 40), reference)


def test_dataset_served_over_http_gives_the_same_batches_and_resumes(dataset: Path, http_root: str):
    reference = take(iter(TokenLoader(dataset, dp_rank=0, dp_size=1, **KW)), 60)
    assert_reads_then_resumes(f"{http_root}/ds", reference, dp_rank=0, dp_size=1, **KW)


def test_unreachable_url_is_retried_with_backoff_then_named(dataset: Path):
    port = closed_port()
    relist(dataset, lambda p: f"http://127.0.0.1:{port}/{p.name}")
    opts = ReadOptions(retries=2, backoff=0.01, timeout=30)
    loader = TokenLoader(dataset, dp_rank=0, dp_size=1, read_options=opts, **KW)
    with pytest.raises(DatasetError, match=rf"http://127\.0\.0\.1:{port}/train-\d+\.tar: unreachable after 3 attempts"):
        next(iter(loader))


def test_missing_manifest_url_is_named(http_root: str):
    with pytest.raises(DatasetError, match=rf"{http_root}/nothing/manifest\.json: manifest cannot be read"):
        TokenLoader(f"{http_root}/nothing", dp_rank=0, dp_size=1, **KW)


def test_stalled_read_raises_after_the_timeout(dataset: Path):
    relist(dataset, lambda p: "pipe:exec sleep 60")
    loader = TokenLoader(dataset, dp_rank=0, dp_size=1, read_options=ReadOptions(timeout=0.5, retries=0), **KW)
    with pytest.raises(DatasetError, match=r"pipe:exec sleep 60: read stalled: no data for 0\.5s \(data\.timeout\)"):
        next(iter(loader))


def _write_member(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as tar:
        tar.write({"__key__": "doc-0", "npy": buf.getvalue()})


@pytest.mark.parametrize("array,message", [
    (np.arange(10, dtype=np.float32), r"member doc-0\.npy holds float32 of shape \(10,\), expected a 1-D uint16"),
    (np.arange(10, dtype=np.uint16).reshape(2, 5), r"member doc-0\.npy holds uint16 of shape \(2, 5\)"),
])
def test_member_of_wrong_dtype_or_shape_is_named(dataset: Path, array: np.ndarray, message: str):
    for s in read_manifest(dataset).splits["train"]:
        _write_member(dataset / s.file, array)
    with pytest.raises(DatasetError, match=rf"train-\d+\.tar: {message}"):  # as read from a URL: no checksum
        next(iter(TokenLoader(dataset, dp_rank=0, dp_size=1, verify_checksums=False, **KW)))


def test_token_id_beyond_the_vocabulary_is_named(dataset: Path):
    m = read_manifest(dataset)
    write_manifest(dataset, Manifest(m.dtype, m.splits, TokenizerInfo("tokenizer.json", 1000, 0)))
    with pytest.raises(DatasetError, match=r"train-\d+\.tar: member train-\d+\.npy has token id \d+ >= vocabulary size 1000"):
        for _ in iter(TokenLoader(dataset, dp_rank=0, dp_size=1, **KW)):
            pass


def test_on_bad_shard_skip_warns_counts_and_goes_on(dataset: Path):
    shards = read_manifest(dataset).splits["train"]
    bad = dataset / shards[2].file
    bad.write_bytes(bad.read_bytes()[:700])  # truncated inside a member
    (dataset / shards[4].file).unlink()  # missing
    with pytest.raises(DatasetError, match=rf"{shards[4].file}: shard file is missing"):
        TokenLoader(dataset, dp_rank=0, dp_size=1, **KW)
    loader = TokenLoader(dataset, dp_rank=0, dp_size=1, on_bad_shard="skip", **KW)
    good = sum(s.tokens for i, s in enumerate(shards) if i not in (2, 4))
    with pytest.warns(RuntimeWarning, match=r"skipping bad shard.*(corrupt shard|shard file is missing)"):
        tokens = np.concatenate([b.input_ids.numpy().ravel() for b in take(iter(loader), good // 64 - 1)])
    assert loader.skipped_shards == 2
    assert len(np.unique(tokens)) == len(tokens)  # the good shards' tokens, none repeated
