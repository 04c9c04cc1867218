"""Per-rank token streams: shard reading with resume offsets, and packing into fixed-length samples.

A rank's stream (one per lane: a row of the micro-batch) is the concatenation of documents of its
shards, epoch after epoch. The packer cuts it into samples of ``seq_len + 1`` tokens that overlap by one token, so every token is an input
exactly once, and counts per (epoch, shard) how many tokens have been consumed as inputs: that
count is the whole resume state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.data.manifest import DatasetError, ShardInfo, TokenizerInfo, is_url, join_location, read_manifest
from pretrain.data.sampling import document_permutation, rank_shards
from pretrain.data.shards import ReadOptions, read_shard, verify_shard



@dataclass
class ShardProgress:
    """What a rank consumed of one shard in one epoch: whole documents and the tokens of partial ones.

    Documents are numbered by their order in the shard. Because documents are read in a shuffled
    order, consumption is a set, not a prefix; it is independent of the DP layout, so any set of
    ranks can resume from it.
    """

    done: set[int] = field(default_factory=set)
    partial: dict[int, int] = field(default_factory=dict)  # document -> tokens consumed as inputs
    full: bool = False  # every document consumed


# consumed[epoch][shard_index]: the resume state of one source on one rank
Consumed = dict[int, dict[int, ShardProgress]]


class Source:
    """One split of one dataset (a directory or a URL holding manifest.json): its shards, and reading them.

    ``on_bad_shard="skip"`` turns an unreadable shard into a warning and an empty shard, counted
    in ``skipped``; ``"error"`` raises the DatasetError that names it.
    """

    def __init__(self, dataset_dir: str | Path, split: str, verify_checksums: bool = True,
                 options: ReadOptions = ReadOptions(), on_bad_shard: str = "error"):
        if on_bad_shard not in ("error", "skip"):
            raise ValueError(f"on_bad_shard must be 'error' or 'skip', got {on_bad_shard!r}")
        self.location = str(dataset_dir)
        self.dir = Path(dataset_dir)  # meaningful for local datasets
        manifest = read_manifest(self.location)
        self.split = split
        self.shards: list[ShardInfo] = manifest.shards(split)
        self.tokenizer: TokenizerInfo | None = manifest.tokenizer
        self.verify_checksums = verify_checksums
        vocab = manifest.tokenizer.vocab_size if manifest.tokenizer else options.vocab_size
        self.options = dataclasses.replace(options, dtype=manifest.dtype, vocab_size=vocab)
        self.on_bad_shard = on_bad_shard
        self.skipped: list[str] = []
        self.cache_shards = 2  # documents of this many recently read shards stay in memory
        self.prefetch: Executor | None = None  # set to read the shards of a group concurrently
        self._cache: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self._verified: set[int] = set()
        for shard in self.shards:
            url = join_location(self.location, shard.file)
            if not is_url(url) and not Path(url).is_file() and on_bad_shard == "error":
                raise DatasetError(
                    f"{url}: shard file is missing; re-create the dataset with "
                    f"tools/prepare_data.py (embedded corpus: delete its directory to rebuild)"
                )
        # Identifies the shard list, so a state saved on other data is refused rather than misapplied.
        listing = "\n".join(f"{s.file} {s.tokens} {s.sha256}" for s in self.shards)
        self.fingerprint = hashlib.sha256(listing.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    def url(self, index: int) -> str:
        return join_location(self.location, self.shards[index].file)

    def read(self, index: int) -> list[np.ndarray]:
        """The documents of shard ``index`` (kept in a small cache: several lanes read each shard)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        docs = self._read(index)
        self._cache[index] = docs
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return docs

    def read_many(self, indices: list[int]) -> None:
        """Read several shards into the cache, concurrently when a ``prefetch`` pool is set."""
        todo = [i for i in indices if i not in self._cache]
        if self.prefetch is None or len(todo) < 2:
            return
        for i, docs in zip(todo, self.prefetch.map(self._read, todo)):
            self._cache[i] = docs
        while len(self._cache) > max(self.cache_shards, len(indices)):
            self._cache.popitem(last=False)

    def _read(self, index: int) -> list[np.ndarray]:
        shard, url = self.shards[index], self.url(index)
        try:
            if self.verify_checksums and shard.sha256 and index not in self._verified and not is_url(url):
                verify_shard(Path(url), shard)
                self._verified.add(index)
            return read_shard(url, shard, self.options)
        except DatasetError as e:
            if self.on_bad_shard == "error":
                raise
            self.skipped.append(url)
            warnings.warn(f"skipping bad shard (data.on_bad_shard=skip): {e}", RuntimeWarning, stacklevel=2)
            return []


@dataclass
class Piece:
    """The rest of one document from one shard (the whole document unless resuming inside it)."""

    epoch: int
    shard: int
    doc: int  # index of the document within its shard
    tokens: np.ndarray
    position: int  # position id of tokens[0] within its document


def _group_documents(source: Source, group: list[int], progress: dict[int, ShardProgress],
                     key: tuple[int, ...], shuffle: bool) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """(shard, doc, tokens) of a group of shards: in file order, or permuted by ``key``; tokens is
    None for a document of a shard already finished."""
    docs: list[tuple[int, int, np.ndarray | None]] = []
    source.read_many([i for i in group if not (i in progress and progress[i].full)])
    for i in group:  # a finished shard is not read, but keeps its places so the order stays the same
        if i in progress and progress[i].full:
            docs += [(i, d, None) for d in range(source.shards[i].documents)]
        else:
            docs += [(i, d, doc) for d, doc in enumerate(source.read(i))]
    order = document_permutation(len(docs), *key) if shuffle else range(len(docs))
    for j in order:
        yield docs[j]


def iter_pieces(
    source: Source, seed: int, dp_rank: int, dp_size: int, start_epoch: int, skip: Consumed,
    shuffle_shards: int = 0, lane: int = 0, lanes: int = 1,
) -> Iterator[Piece]:
    """One lane of this rank's infinite token stream from ``start_epoch`` on, skipping consumed tokens.

    The rank's shards of an epoch are taken in groups of ``shuffle_shards``; the documents of a
    group are emitted in an order permuted by (seed, epoch, group), so neighbouring samples come
    from different shards, and dealt round-robin to ``lanes`` streams (one per row of a
    micro-batch), so the rows of a batch come from different documents. ``shuffle_shards=0``
    keeps file order in one lane.
    """
    epoch = start_epoch
    size = max(1, shuffle_shards)
    while True:
        shards = rank_shards(len(source.shards), seed, epoch, dp_rank, dp_size)
        progress = skip.get(epoch, {})
        dealt = 0  # documents this lane was dealt in the epoch, consumed ones included
        for g in range(0, len(shards), size):
            group = shards[g : g + size]
            docs = _group_documents(source, group, progress, (seed, epoch, *group), shuffle_shards > 0)
            for shard, d, doc in itertools.islice(docs, lane, None, lanes):
                dealt += 1
                seen = progress.get(shard)
                if doc is None or (seen is not None and d in seen.done):
                    continue
                lo = seen.partial.get(d, 0) if seen is not None else 0
                yield Piece(epoch, shard, d, doc[lo:], lo)
        if not dealt:  # it would read epoch after epoch for ever
            raise _starved_lane(source, shards, size, epoch, dp_rank, lane, lanes)
        epoch += 1


def _starved_lane(source: Source, shards: list[int], size: int, epoch: int, dp_rank: int, lane: int,
                  lanes: int) -> DatasetError:
    largest = max((sum(source.shards[i].documents for i in shards[g : g + size])
                   for g in range(0, len(shards), size)), default=0)
    skipped = f"; {len(source.skipped)} of its shards were skipped as unreadable" if source.skipped else ""
    return DatasetError(
        f"{source.location}: split {source.split!r}: row {lane} of a micro-batch gets no document in epoch {epoch}: "
        f"the {lanes} rows take turns over the documents of each group of data.shuffle_shards={size} shards, and "
        f"DP rank {dp_rank}'s groups hold at most {largest}{skipped}; lower train.micro_batch_size, raise "
        "data.shuffle_shards, use fewer DP ranks, or use a split with more documents")


class Packer:
    """Cuts a piece stream into samples of seq_len + 1 tokens overlapping by one, tracking consumption."""

    def __init__(self, pieces: Iterator[Piece], seq_len: int, consumed: Consumed, epoch: int,
                 documents: list[int]):
        self.seq_len = seq_len
        self.documents = documents  # documents per shard, from the manifest
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
            shards = self.consumed.setdefault(piece.epoch, {})
            progress = shards.setdefault(piece.shard, ShardProgress())
            self._head += n
            self._available -= n
            count -= n
            if self._head == piece.tokens.size:
                progress.partial.pop(piece.doc, None)
                progress.done.add(piece.doc)
                if len(progress.done) == self.documents[piece.shard]:  # forget a finished shard's documents
                    shards[piece.shard] = ShardProgress(full=True)
                self._pending.popleft()
                self._head = 0
            else:
                progress.partial[piece.doc] = piece.position + self._head
        # One token always stays pending (the last label), so the next token's epoch is known.
        self.epoch = self._pending[0].epoch
