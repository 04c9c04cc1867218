"""Loader workers: a background process with prefetch gives exactly the in-process batches and states."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.data import DatasetError, TokenLoader, read_manifest
from pretrain.data.workers import BackgroundLoader, make_loader
from tests.test_data import assert_same_batches, make_dataset, take

KW = dict(split="train", seq_len=32, micro_batch_size=3, dp_rank=1, dp_size=2, seed=6, shuffle_shards=2)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds", num_shards=8)


def test_background_worker_gives_the_same_batches_states_and_resume(dataset: Path):
    reference = TokenLoader(dataset, **KW)
    ref_iter = iter(reference)
    ref_batches = take(ref_iter, 25)
    loader = make_loader(num_workers=2, prefetch=3, dataset_dir=dataset, **KW)
    assert isinstance(loader, BackgroundLoader)
    try:
        assert_same_batches(take(iter(loader), 25), ref_batches)
        assert loader.state_dict() == reference.state_dict()  # the state of what was consumed, not prefetched
        resumed = make_loader(num_workers=1, dataset_dir=dataset, **KW)
        resumed.load_state_dict(TokenLoader.merge_states([loader.state_dict(), TokenLoader(dataset, **{**KW, "dp_rank": 0}).state_dict()]))
        assert_same_batches(take(iter(resumed), 15), take(ref_iter, 15))
        resumed.close()
    finally:
        loader.close()


def test_a_bad_shard_in_the_worker_is_raised_in_the_training_process(dataset: Path):
    loader = make_loader(num_workers=1, dataset_dir=dataset, **KW)
    for s in read_manifest(dataset).splits["train"]:
        (dataset / s.file).unlink()
    try:
        with pytest.raises(DatasetError, match=r"train-\d+\.tar: shard file is missing"):
            next(iter(loader))
    finally:
        loader.close()


def _train(run_dir: str, workers: int) -> list[dict]:
    from helpers import TINY, train

    records, trainer = train(TINY + ["train.max_steps=6", f"data.num_workers={workers}", "data.prefetch=2"], run_dir)
    getattr(trainer.loader, "close", lambda: None)()
    return records


def test_training_with_a_loader_worker_gives_the_same_losses(tmp_path: Path):
    from helpers import losses, run_distributed

    # Same process count, thread count and batches in both runs, so the losses are bit-identical.
    in_process = run_distributed(_train, 2, str(tmp_path / "w0"), 0)[0]
    background = run_distributed(_train, 2, str(tmp_path / "w1"), 1)[0]
    assert len(losses(in_process)) == 6
    assert losses(background) == losses(in_process)
