"""Per-rank token streams: shard reading with resume offsets, and packing into fixed-length samples.

A rank's stream is the concatenation of its shards' documents, epoch after epoch. The packer cuts
it into samples of ``seq_len + 1`` tokens that overlap by one token, so every token is an input
exactly once, and counts per (epoch, shard) how many tokens have been consumed as inputs: that
count is the whole resume state.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.data.manifest import DatasetError, ShardInfo, TokenizerInfo, read_manifest
from pretrain.data.sampling import rank_shards
from pretrain.data.shards import iter_shard_documents, verify_shard

# consumed[epoch][shard_index] = tokens of that shard consumed as inputs
Consumed = dict[int, dict[int, int]]


class Source:
    """One split of one dataset directory: its shards, and reading them (optionally verified)."""

    def __init__(self, dataset_dir: str | Path, split: str, verify_checksums: bool = False):
        self.dir = Path(dataset_dir)
        manifest = read_manifest(self.dir)
        self.split = split
        self.shards: list[ShardInfo] = manifest.shards(split)
        self.tokenizer: TokenizerInfo | None = manifest.tokenizer
        self.verify_checksums = verify_checksums
        self._verified: set[int] = set()
        for shard in self.shards:
            if not (self.dir / shard.file).is_file():
                raise DatasetError(
                    f"{self.dir / shard.file}: shard file is missing; re-create the dataset with "
                    f"tools/prepare_data.py (embedded corpus: delete its directory to rebuild)"
                )
        # Identifies the shard list, so a state saved on other data is refused rather than misapplied.
        listing = "\n".join(f"{s.file} {s.tokens} {s.sha256}" for s in self.shards)
        self.fingerprint = hashlib.sha256(listing.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return self.dir.name

    def read(self, index: int) -> Iterator[np.ndarray]:
        """The documents of shard ``index``, streamed; checksum verified on first use if asked."""
        shard = self.shards[index]
        path = self.dir / shard.file
        if self.verify_checksums and index not in self._verified:
            verify_shard(path, shard)
            self._verified.add(index)
        return iter_shard_documents(path, shard)


@dataclass
class Piece:
    """A contiguous run of one document's tokens from one shard."""

    epoch: int
    shard: int
    tokens: np.ndarray
    position: int  # position id of tokens[0] within its document


def iter_pieces(
    source: Source, seed: int, dp_rank: int, dp_size: int, start_epoch: int, skip: Consumed
) -> Iterator[Piece]:
    """This rank's infinite token stream from ``start_epoch`` on, skipping already consumed tokens.

    Shards start at document boundaries, so a resume offset inside a shard maps to a position
    within a document by walking the shard's document lengths.
    """
    epoch = start_epoch
    while True:
        for index in rank_shards(len(source.shards), seed, epoch, dp_rank, dp_size):
            offset = skip.get(epoch, {}).get(index, 0)
            if offset >= source.shards[index].tokens:
                continue
            doc_start = 0
            for doc in source.read(index):
                doc_end = doc_start + doc.size
                if doc_end > offset:
                    lo = max(0, offset - doc_start)
                    yield Piece(epoch, index, doc[lo:], lo)
                doc_start = doc_end
        epoch += 1


class Packer:
    """Cuts a piece stream into samples of seq_len + 1 tokens overlapping by one, tracking consumption."""

    def __init__(self, pieces: Iterator[Piece], seq_len: int, consumed: Consumed, epoch: int):
        self.seq_len = seq_len
        self.consumed = consumed  # updated in place: the caller's resume state
        self.epoch = epoch  # epoch of the next unconsumed token
        self._pieces = pieces
        self._pending: deque[Piece] = deque()
        self._head = 0  # tokens of _pending[0] already consumed
        self._available = 0

    def next_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, position_ids), each int64 of length seq_len + 1; consumes seq_len tokens."""
        need = self.seq_len + 1
        while self._available < need:
            piece = next(self._pieces)
            self._pending.append(piece)
            self._available += piece.tokens.size
        tokens = np.empty(need, dtype=np.int64)
        positions = np.empty(need, dtype=np.int64)
        filled, offset = 0, self._head
        for piece in self._pending:
            n = min(piece.tokens.size - offset, need - filled)
            tokens[filled : filled + n] = piece.tokens[offset : offset + n]
            start = piece.position + offset
            positions[filled : filled + n] = np.arange(start, start + n)
            filled += n
            offset = 0
            if filled == need:
                break
        self._consume(self.seq_len)
        return tokens, positions

    def _consume(self, count: int) -> None:
        while count:
            piece = self._pending[0]
            n = min(piece.tokens.size - self._head, count)
            per_shard = self.consumed.setdefault(piece.epoch, {})
            per_shard[piece.shard] = per_shard.get(piece.shard, 0) + n
            self._head += n
            self._available -= n
            count -= n
            if self._head == piece.tokens.size:
                self._pending.popleft()
                self._head = 0
        # One token always stays pending (the last label), so the next token's epoch is known.
        self.epoch = self._pending[0].epoch
        for old in [e for e in self.consumed if e < self.epoch]:
            del self.consumed[old]  # every shard of this rank in that epoch is finished
