"""Datasets named by shard patterns in the config (data.train_shards), with no manifest.json: the same
batches as the manifest dataset they equal, through local paths, pipe:cat and http, training that
resumes exactly, and one-line errors for bad patterns."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import ConfigError, compose
from pretrain.data import (
    DatasetError, Manifest, TokenizerInfo, TokenLoader, prepare_embedded_corpus, read_manifest, write_manifest,
)
from pretrain.data.patterns import INDEX_DIR, pattern_dataset
from pretrain.data.shards import write_token_shards
from pretrain.data.tokenizer import eos_id, load_tokenizer
from tests.test_data import assert_reads_then_resumes, assert_same_batches, take
from tests.test_data_streaming import http_root  # noqa: F401  (fixture)

KW = dict(split="train", seq_len=32, micro_batch_size=2, seed=4)
TRAIN = "train-{00000..00005}.tar"
VAL = "val-{00000..00001}.tar"


def write_docs(root: Path, split: str, num_shards: int, seed: int, vocab: int = 1000, eos: int = 0):
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, vocab, int(rng.integers(5, 200))), eos).astype(np.uint16)
            for _ in range(num_shards * 6)]
    per_shard = sum(d.size for d in docs) // num_shards + 1
    return write_token_shards(docs, root, split, per_shard, np.uint16)


@pytest.fixture
def dataset(tmp_path: Path, corpus_cache: Path) -> Path:
    """A manifest dataset of 6 train and 2 val shards, token ids within the TINY 1024-token tokenizer."""
    tokenizer_file = prepare_embedded_corpus(corpus_cache, vocab_size=1024) / "tokenizer.json"
    root = tmp_path / "ds"
    root.mkdir()
    shutil.copy(tokenizer_file, root / "tokenizer.json")
    eos = eos_id(load_tokenizer(root / "tokenizer.json"))
    train, val = write_docs(root, "train", 6, 0, eos=eos), write_docs(root, "val", 2, 1, eos=eos)
    assert (len(train), len(val)) == (6, 2)
    write_manifest(root, Manifest("uint16", {"train": train, "val": val}, TokenizerInfo("tokenizer.json", 1024, eos)))
    return root


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_brace_pattern_gives_the_manifest_datasets_batches_and_indexes_once(dataset: Path, tmp_path: Path, dp_rank: int):
    index = pattern_dataset(str(dataset / TRAIN), str(dataset / VAL), str(dataset / "tokenizer.json"), tmp_path / "idx")
    reference = TokenLoader(dataset, dp_rank=dp_rank, dp_size=2, **KW)
    loader = TokenLoader(index, dp_rank=dp_rank, dp_size=2, **KW)
    assert [Path(f.removeprefix("file://")).name for f in loader.assigned_shards(0)] == reference.assigned_shards(0)
    assert_same_batches(take(iter(loader), 40), take(iter(reference), 40))
    val = TokenLoader(index, **{**KW, "split": "val"}, dp_rank=0, dp_size=1)
    assert_same_batches(take(iter(val), 5), take(iter(TokenLoader(dataset, **{**KW, "split": "val"}, dp_rank=0, dp_size=1)), 5))
    built = (index / "manifest.json").stat().st_mtime_ns
    again = pattern_dataset(str(dataset / TRAIN), str(dataset / VAL), str(dataset / "tokenizer.json"), tmp_path / "idx")
    assert again == index and (index / "manifest.json").stat().st_mtime_ns == built  # the index is reused


@pytest.mark.parametrize("scheme", ["pipe", "http"])
def test_pipe_and_http_pattern_lists_give_the_same_batches_and_resume(dataset: Path, tmp_path: Path, scheme: str,
                                                                       http_root: str):  # noqa: F811
    if scheme == "pipe":
        train = [f"pipe:cat {dataset}/train-{{00000..00002}}.tar", f"pipe:cat {dataset}/train-{{00003..00005}}.tar"]
    else:
        train = [f"{http_root}/ds/{TRAIN}"]
    index = pattern_dataset(train, None, str(dataset / "tokenizer.json"), tmp_path / "idx")
    reference = take(iter(TokenLoader(dataset, dp_rank=0, dp_size=1, **KW)), 40)
    assert_reads_then_resumes(index, reference, dp_rank=0, dp_size=1, **KW)


def _index_on_ranks(dataset: str, log: str, run_dir: str) -> str:
    import torch.distributed as dist

    from pretrain.config import DataConfig
    from pretrain.data.patterns import run_pattern_dataset

    dist.init_process_group("gloo")
    # Every read of shard i appends i to the log, so the test sees which shards were read how often.
    train = [f"pipe:sh -c 'echo {i} >> {log}; cat {dataset}/train-{i:05d}.tar'" for i in range(6)]
    cfg = DataConfig(name="prepared", train_shards=train, tokenizer=f"{dataset}/tokenizer.json", retries=0)
    return (run_pattern_dataset(cfg, run_dir, dp_size=2) / "manifest.json").read_text()


def test_ranks_share_the_indexing_and_agree_on_one_index(dataset: Path, tmp_path: Path):
    from helpers import run_distributed

    log = tmp_path / "reads.log"
    texts = run_distributed(_index_on_ranks, 2, str(dataset), str(log), str(tmp_path / "run"))
    assert texts[0] == texts[1]
    assert sorted(int(line) for line in log.read_text().split()) == list(range(6))  # each shard read once
    counts = [(s["documents"], s["tokens"]) for s in json.loads(texts[0])["splits"]["train"]]
    assert counts == [(s.documents, s.tokens) for s in read_manifest(dataset).splits["train"]]


def _train(run_dir: str, dataset: str, steps: int) -> list[dict]:
    from helpers import TINY, train

    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    records, _ = train([*TINY, "data=prepared", f"data.train_shards='{dataset}/{TRAIN}'",
                        f"data.val_shards='pipe:cat {dataset}/{VAL}'", f"data.tokenizer={dataset}/tokenizer.json",
                        f"train.max_steps={steps}", "checkpoint.interval=3", "train.eval_interval=3",
                        "train.sample_tokens=0"], run_dir)
    return records


def test_training_from_shard_patterns_resumes_exactly(dataset: Path, tmp_path: Path):
    from helpers import losses, run_distributed

    # Same process count and thread count in every run, so the losses are bit-identical.
    full = run_distributed(_train, 1, str(tmp_path / "full"), str(dataset), 6)[0]
    first = run_distributed(_train, 1, str(tmp_path / "split"), str(dataset), 3)[0]
    index = tmp_path / "split" / INDEX_DIR / "manifest.json"
    built = index.stat().st_mtime_ns
    second = run_distributed(_train, 1, str(tmp_path / "split"), str(dataset), 6)[0]
    assert len(losses(full)) == 6 and losses(first) == losses(full)[:3]
    assert losses(second)[-3:] == losses(full)[3:]
    metrics = (tmp_path / "split" / "metrics.jsonl").read_text()
    assert '"eval_loss"' in metrics  # the val patterns (through pipe:cat) were evaluated on
    assert index.stat().st_mtime_ns == built  # the restart read the index, not the shards


def _compose_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        compose(["data=prepared", *overrides], world_size=1)
    return str(err.value)


def test_bad_pattern_config_is_one_line_naming_the_fix(dataset: Path, tmp_path: Path):
    pattern = f"data.train_shards='{dataset}/{TRAIN}'"
    assert "not both" in _compose_error(pattern, "data.path=/x", "data.tokenizer=t", "train.eval_interval=0")
    assert "data.tokenizer=PATH" in _compose_error(pattern, "train.eval_interval=0")
    assert "data.val_shards=PATTERN" in _compose_error(pattern, "data.tokenizer=t")
    unquoted = _compose_error(f"data.train_shards={dataset}/{TRAIN}", "data.tokenizer=t")
    assert "must be quoted" in unquoted and "\n" not in unquoted
    tok = str(dataset / "tokenizer.json")
    cases = {
        "matches no file": (str(dataset / "nope-{0..3}.tar"), tok, 1),
        "train-00006.tar: shard file is missing": (str(dataset / "train-{00000..00007}.tar"), tok, 1),
        "tokenizer file not found": (str(dataset / TRAIN), str(dataset / "missing.json"), 1),
        "names 6 shards but dp_size is 8": (str(dataset / TRAIN), tok, 8),
        "names shard": ([str(dataset / TRAIN), str(dataset / "train-00001.tar")], tok, 1),
        "names no shards": ([], tok, 1),
    }
    for expected, (train, tokenizer, dp) in cases.items():
        with pytest.raises(DatasetError, match=expected) as err:
            pattern_dataset(train, None, tokenizer, tmp_path / "idx", dp_size=dp)
        assert "\n" not in str(err.value)
    big = tmp_path / "big"
    big.mkdir()
    write_docs(big, "train", 1, 2, vocab=5000)
    with pytest.raises(DatasetError, match=r"train-00000.tar: member .* token id \d+ >= vocabulary size 1024"):
        pattern_dataset(str(big / "train-00000.tar"), None, tok, tmp_path / "idx")
    assert not (tmp_path / "idx").exists()  # nothing written for a bad dataset
