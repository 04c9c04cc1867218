"""Data pipeline: token shards, packed resumable batches per DP rank, the embedded default corpus."""

from pretrain.data.embedded import prepare_embedded_corpus
from pretrain.data.loader import Batch, TokenLoader
from pretrain.data.manifest import DatasetError, Manifest, ShardInfo, TokenizerInfo, read_manifest, write_manifest
from pretrain.data.prepare import prepare_dataset
from pretrain.data.shards import write_token_shards
from pretrain.data.state import StateError
from pretrain.data.tokenizer import EOS_TOKEN, load_tokenizer, save_hf_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN",
    "Batch",
    "DatasetError",
    "Manifest",
    "ShardInfo",
    "StateError",
    "TokenLoader",
    "TokenizerInfo",
    "load_tokenizer",
    "prepare_dataset",
    "prepare_embedded_corpus",
    "read_manifest",
    "save_hf_tokenizer",
    "train_tokenizer",
    "write_manifest",
    "write_token_shards",
]
