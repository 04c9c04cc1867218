"""Deterministic choices of the data pipeline: shard orders, document orders, mixture blending.

Resuming a run must reproduce the exact same shard order years later, on any machine. NumPy and
torch do not promise stable random streams across versions, so the few random decisions the
pipeline makes come from splitmix64, a tiny, fully specified integer hash.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One splitmix64 step: a well-mixed 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_ints(*values: int) -> int:
    """A 64-bit hash of a tuple of non-negative integers (order matters)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = splitmix64(h ^ splitmix64(v & _MASK64))
    return h


def uniform(*values: int) -> float:
    """A uniform float in [0, 1) determined by ``values``."""
    return (hash_ints(*values) >> 11) / float(1 << 53)


def shard_permutation(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The order of a split's shards in ``epoch``: a Fisher-Yates shuffle keyed by (seed, epoch)."""
    order = list(range(num_shards))
    for i in range(num_shards - 1, 0, -1):
        j = hash_ints(seed, epoch, i) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def rank_shards(num_shards: int, seed: int, epoch: int, dp_rank: int, dp_size: int) -> list[int]:
    """Shard indices that DP rank ``dp_rank`` reads in ``epoch``, in reading order.

    Rank r takes permuted positions r, r + dp_size, ...: disjoint across ranks, covering all.
    """
    return shard_permutation(num_shards, seed, epoch)[dp_rank::dp_size]


def blend_source(weights: list[float], counts: list[int]) -> int:
    """The mixture source of the next sample: the one furthest below its share so far.

    After n samples every source has within one sample of weight * n, so the realised token
    proportions match the weights at any scale, and the choice depends only on ``counts``
    (saved in the loader state), which makes a resumed mixture continue exactly.
    """
    total = sum(weights)
    n = sum(counts) + 1
    deficits = [w / total * n - c for w, c in zip(weights, counts)]
    return max(range(len(weights)), key=lambda k: (deficits[k], -k))


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 over a uint64 array (wrapping arithmetic, same values as ``splitmix64``)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def document_permutation(num_docs: int, *key: int) -> np.ndarray:
    """A permutation of range(num_docs) fixed by ``key``: indices sorted by a keyed hash.

    Vectorised (a group of shards can hold 10^5 documents) and, like shard_permutation, built
    only from splitmix64 so it never changes with library versions.
    """
    salt = np.uint64(hash_ints(*key))
    keys = _splitmix64_array(np.arange(num_docs, dtype=np.uint64) ^ salt)
    return np.argsort(keys, kind="stable")
