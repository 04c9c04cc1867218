"""TokenLoader: packed [batch, seq] batches for one DP rank, infinite, exactly resumable.

In epoch e the split's shards are permuted by (seed, e) and rank r reads permuted shards
r, r + dp_size, ...; it reads them in groups of ``shuffle_shards`` and emits each group's
documents in a seeded random order (a shuffle spanning several shards, so consecutive samples do
not all come from one part of the corpus). The documents are packed back to back into samples of seq_len + 1
tokens overlapping by one (input_ids = sample[:-1], labels = sample[1:]); position_ids restart at
0 at every document start so attention can keep documents apart. Several datasets can be mixed by
weight: each sample comes whole from one source, the one furthest below its share so far.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from pretrain.data.manifest import DatasetError
from pretrain.data.packing import Consumed, Packer, Source, iter_pieces
from pretrain.data.sampling import blend_source, rank_shards
from pretrain.data.shards import ReadOptions
from pretrain.data.state import STATE_VERSION, localize_state, merge_rank_states, source_state

DatasetSpec = Union[str, Path, Sequence[tuple[Union[str, Path], float]]]


@dataclass
class Batch:
    """One micro-batch; every tensor is int64 of shape [micro_batch_size, seq_len]."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # next-token targets: labels[:, t] == token after input_ids[:, t]
    position_ids: torch.Tensor  # 0 at each document start (flash-attn varlen boundaries)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.input_ids, self.labels, self.position_ids)))

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


class TokenLoader:
    """Batches for DP rank ``dp_rank`` of ``dp_size`` from one dataset or a weighted mixture.

    ``dataset_dir`` is a dataset directory (or a URL webdataset opens, holding manifest.json) or a
    list of (dataset, weight). Iterating is
    infinite; state_dict() after a batch, merged over ranks with merge_states(), lets
    load_state_dict() continue at the exact next token, also under a different dp_size.
    """

    def __init__(
        self,
        dataset_dir: DatasetSpec,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        verify_checksums: bool = True,
        shuffle_shards: int = 8,
        read_options: ReadOptions = ReadOptions(),
        on_bad_shard: str = "error",
    ):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        specs = [(dataset_dir, 1.0)] if isinstance(dataset_dir, (str, Path)) else list(dataset_dir)
        if not specs or any(w <= 0 for _, w in specs):
            raise ValueError("a mixture needs at least one (dataset_dir, weight) pair, every weight > 0")
        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        if shuffle_shards < 0:
            raise ValueError(f"shuffle_shards must be >= 0, got {shuffle_shards}")
        self.shuffle_shards = shuffle_shards
        self.sources = [Source(d, split, verify_checksums, read_options, on_bad_shard) for d, _ in specs]
        self._weights = [float(w) for _, w in specs]
        for source in self.sources:
            if len(source.shards) < dp_size:
                raise DatasetError(
                    f"{source.dir}: split {split!r} has {len(source.shards)} shards but dp_size is {dp_size}; "
                    f"each DP rank needs its own shards: re-create the dataset with smaller shards "
                    f"(tools/prepare_data.py --tokens-per-shard) or use fewer DP ranks"
                )
        tokenizers = {(s.tokenizer.vocab_size, s.tokenizer.eos_id) for s in self.sources if s.tokenizer}
        if len(tokenizers) > 1:
            raise DatasetError(f"mixture sources use different tokenizers {sorted(tokenizers)}; tokenize them all with one")
        self._epochs = [0] * len(self.sources)  # per source: epoch of the next unconsumed token
        self._consumed: list[Consumed] = [{} for _ in self.sources]
        self._draws = 0
        self.lanes = micro_batch_size if shuffle_shards else 1
        self._lane_draws = [0] * len(self.sources)  # per source: samples taken, which picks the next lane
        for source in self.sources:
            source.cache_shards = 2 * max(1, shuffle_shards)  # lanes drift apart by up to a group
        self._generation = 0  # bumped by load_state_dict so stale iterators stop

    @property
    def skipped_shards(self) -> int:
        """Shards skipped as unreadable so far (data.on_bad_shard=skip), over all sources."""
        return sum(len(s.skipped) for s in self.sources)

    def assigned_shards(self, epoch: int, source: int = 0) -> list[str]:
        """File names of the shards this rank reads in ``epoch``, in reading order."""
        src = self.sources[source]
        return [src.shards[i].file for i in rank_shards(len(src.shards), self.seed, epoch, self.dp_rank, self.dp_size)]

    def __iter__(self) -> Iterator[Batch]:
        generation = self._generation
        packers = []
        for k, source in enumerate(self.sources):
            skip = copy.deepcopy(self._consumed[k])  # snapshot: what each shard has left
            documents = [s.documents for s in source.shards]
            packers.append([
                Packer(iter_pieces(source, self.seed, self.dp_rank, self.dp_size, self._epochs[k], skip,
                                   self.shuffle_shards, lane, self.lanes),
                       self.seq_len, self._consumed[k], self._epochs[k], documents)
                for lane in range(self.lanes)
            ])
        while True:
            samples = []
            for _ in range(self.micro_batch_size):
                if generation != self._generation:
                    raise RuntimeError("load_state_dict() was called; start a new iteration over the loader")
                k = 0 if len(packers) == 1 else blend_source(self._weights, self._lane_draws)
                samples.append(packers[k][self._lane_draws[k] % self.lanes].next_sample())
                self._draws += 1
                self._lane_draws[k] += 1
                self._epochs[k] = min(p.epoch for p in packers[k])
                for old in [e for e in self._consumed[k] if e < self._epochs[k]]:
                    del self._consumed[k][old]  # every shard of this rank in that epoch is finished
            tokens = torch.from_numpy(np.stack([t for t, _ in samples]))
            positions = torch.from_numpy(np.stack([p for _, p in samples]))
            yield Batch(tokens[:, :-1], tokens[:, 1:], positions[:, :-1])

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-serialisable, a few KB); merge all ranks' with merge_states()."""
        return {
            "version": STATE_VERSION,
            "kind": "rank",
            "seed": self.seed,
            "split": self.split,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "draws": self._draws,
            "lane_draws": list(self._lane_draws),
            "sources": [source_state(s, e, c) for s, e, c in zip(self.sources, self._epochs, self._consumed)],
        }

    @staticmethod
    def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
        """The per-rank states of all DP ranks → one global state loadable under any dp_size."""
        return merge_rank_states(states)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a merged global state (or a single-rank run's own state)."""
        local, draws, lane_draws = localize_state(state, self.sources, self.seed, self.split, self.dp_rank,
                                                  self.dp_size)
        for k, (epoch, consumed) in enumerate(local):
            self._epochs[k] = epoch
            self._consumed[k].clear()
            self._consumed[k].update(consumed)
        self._draws = draws
        self._lane_draws = lane_draws
        self._generation += 1
