"""Start-up checks: a dataset that cannot serve the run is refused before step 1, in one line naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.data import DatasetError, Manifest, TokenizerInfo, read_manifest, train_tokenizer, write_manifest
from pretrain.data.checks import check_dataset
from tests.test_data import make_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = make_dataset(tmp_path / "ds", num_shards=4)
    tok = train_tokenizer(["some text to learn a few merges from", "more text"], 300)
    tok.save(str(root / "tokenizer.json"))
    m = read_manifest(root)
    write_manifest(root, Manifest(m.dtype, m.splits, TokenizerInfo("tokenizer.json", tok.get_vocab_size(), 0)))
    return root


def test_a_fitting_dataset_passes_and_reports_its_vocabulary(dataset: Path):
    assert check_dataset(dataset, ["train", "val"], dp_size=1) == read_manifest(dataset).tokenizer.vocab_size


def test_missing_val_split_names_the_fix(dataset: Path):
    m = read_manifest(dataset)
    write_manifest(dataset, Manifest(m.dtype, {"train": m.splits["train"]}, m.tokenizer))
    with pytest.raises(DatasetError, match=r"needs split 'val' but the dataset has \['train'\].*train\.eval_interval=0"):
        check_dataset(dataset, ["train", "val"], dp_size=1)
    check_dataset(dataset, ["train"], dp_size=1)  # a run without eval does not need it


def test_too_few_shards_for_the_dp_size_names_the_fix(dataset: Path):
    n = len(read_manifest(dataset).splits["val"])
    with pytest.raises(DatasetError, match=rf"split 'val' has {n} shards but dp_size is {n + 1}.*--min-val-shards"):
        check_dataset(dataset, ["val"], dp_size=n + 1)
    with pytest.raises(DatasetError, match=r"split 'train' has 4 shards but dp_size is 5.*--tokens-per-shard"):
        check_dataset(dataset, ["train"], dp_size=5)


def test_tokenizer_that_differs_from_the_manifest_is_refused(dataset: Path):
    train_tokenizer(["other words entirely, a different tokenizer"], 280).save(str(dataset / "tokenizer.json"))
    with pytest.raises(DatasetError, match=r"tokenizer file has \d+ tokens .* but the manifest says \d+.*re-create the dataset"):
        check_dataset(dataset, ["train"], dp_size=1)
