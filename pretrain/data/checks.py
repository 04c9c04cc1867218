"""Start-up checks of a dataset against the run, so a mismatch stops before step 1, not at the first eval."""

from __future__ import annotations

from pathlib import Path

from pretrain.config import ConfigError
from pretrain.data.manifest import DatasetError, read_manifest
from pretrain.data.tokenizer import eos_id, load_tokenizer


def check_dataset(location: str | Path, splits: list[str], dp_size: int) -> int:
    """Raise DatasetError (one line naming the fix) unless the run can read every split it needs.

    Checks that each split exists, holds at least one shard per DP rank, and that the dataset's
    tokenizer file agrees with its manifest. Returns the tokenizer's vocabulary size.
    """
    manifest = read_manifest(location)
    for split in splits:
        if split not in manifest.splits or not manifest.splits[split]:
            fix = ("re-create it with tools/prepare_data.py --val-fraction > 0, or set train.eval_interval=0"
                   if split == "val" else "re-create it with tools/prepare_data.py")
            raise DatasetError(f"{location}: the run needs split {split!r} but the dataset has "
                               f"{sorted(k for k, v in manifest.splits.items() if v)}; {fix}")
        count = len(manifest.splits[split])
        if count < dp_size:
            option = "--min-val-shards" if split == "val" else "--tokens-per-shard"
            raise DatasetError(f"{location}: split {split!r} has {count} shards but dp_size is {dp_size}; each DP rank "
                               f"needs its own: re-create it with tools/prepare_data.py {option}, or use fewer DP ranks")
    tokenizer = load_tokenizer(location)
    info = manifest.tokenizer
    if info is not None and (tokenizer.get_vocab_size(), eos_id(tokenizer)) != (info.vocab_size, info.eos_id):
        raise DatasetError(f"{location}: its tokenizer file has {tokenizer.get_vocab_size()} tokens (eos "
                           f"{eos_id(tokenizer)}) but the manifest says {info.vocab_size} (eos {info.eos_id}); "
                           f"the shards were tokenized with another tokenizer: re-create the dataset")
    return tokenizer.get_vocab_size()


def check_run_data(dataset: str | Path, sources: list[str | Path], with_val: bool, dp_size: int,
                   model_vocab: int) -> int:
    """check_dataset for the run's dataset (with its val split when the run evaluates) and every
    mixture source, then that model.vocab_size holds the largest tokenizer; returns that size.
    Run by every worker, and by the launcher before it starts any (launch/__main__.py)."""
    vocab = check_dataset(dataset, ["train", "val"] if with_val else ["train"], dp_size)
    for source in sources:
        vocab = max(vocab, check_dataset(source, ["train"], dp_size))
    if vocab > model_vocab:
        raise ConfigError(f"config error: model.vocab_size: {model_vocab} is smaller than the tokenizer's {vocab} "
                          f"tokens in {dataset}; raise model.vocab_size")
    return vocab
