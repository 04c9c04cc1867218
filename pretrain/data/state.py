"""The loader's resume state: per-rank states, their merge into a layout-free global state, and back.

What is recorded is, per source and epoch, which documents of each shard (by index in the
manifest) have been consumed as inputs, and how many tokens of a partly consumed document. That is independent of the DP layout: any set of ranks can
resume from it, each reading the unconsumed remainder of the shards it is assigned. A rank's
state covers its current epoch and any later epoch it already knows about; older epochs are
finished and dropped. In a merged state, ``-1`` marks a shard that a rank ahead of the others
finished.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from pretrain.data.packing import Consumed, ShardProgress, Source
from pretrain.data.sampling import rank_shards

STATE_VERSION = 2  # 1 recorded a consumed prefix per shard, before documents were shuffled
FULL = -1


class StateError(ValueError):
    """A loader state that does not fit this loader; the message says what differs and what to do."""


def _encode_progress(p: ShardProgress) -> int | dict[str, Any]:
    if p.full:
        return FULL
    bits = np.zeros(max(p.done) + 1 if p.done else 0, dtype=bool)
    bits[sorted(p.done)] = True
    return {"done": base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode(),
            "partial": {str(d): n for d, n in sorted(p.partial.items())}}


def _decode_progress(entry: int | dict[str, Any]) -> ShardProgress:
    if entry == FULL:
        return ShardProgress(full=True)
    if not isinstance(entry, dict):
        raise StateError(f"malformed shard entry {entry!r} in the loader state")
    bits = np.unpackbits(np.frombuffer(base64.b64decode(entry["done"]), dtype=np.uint8), bitorder="little")
    return ShardProgress(set(np.flatnonzero(bits).tolist()), {int(d): int(n) for d, n in entry["partial"].items()})


def source_state(source: Source, epoch: int, consumed: Consumed) -> dict[str, Any]:
    """JSON-ready state of one source on one rank: a bitmap of finished documents per partly read shard."""
    return {
        "name": source.name,
        "fingerprint": source.fingerprint,
        "num_shards": len(source.shards),
        "epoch": epoch,
        "consumed": {str(e): {str(i): _encode_progress(p) for i, p in sorted(d.items())}
                     for e, d in sorted(consumed.items()) if d},
    }


def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the states of all DP ranks (any order) into one global, layout-independent state."""
    if not states:
        raise StateError("merge_states needs the states of all DP ranks, got none")
    for s in states:
        if s.get("version") != STATE_VERSION or s.get("kind") != "rank":
            raise StateError(f"not a version-{STATE_VERSION} per-rank loader state: pass TokenLoader.state_dict() results")
    first = states[0]
    dp_size, seed = first["dp_size"], first["seed"]
    ranks = sorted(s["dp_rank"] for s in states)
    if ranks != list(range(dp_size)):
        raise StateError(f"merge_states needs exactly one state per DP rank 0..{dp_size - 1}, got ranks {ranks}")
    ordered = sorted(states, key=lambda s: s["dp_rank"])
    for s in ordered:
        if (s["dp_size"], s["seed"], s["split"], len(s["sources"])) != (dp_size, seed, first["split"], len(first["sources"])):
            raise StateError(f"rank {s['dp_rank']}'s state differs from rank 0's in dp_size, seed, split or sources")
    sources = []
    for k, src in enumerate(first["sources"]):
        per_rank = [s["sources"][k] for s in ordered]
        if any(p["fingerprint"] != src["fingerprint"] for p in per_rank):
            raise StateError(f"source {k} ({src['name']}) differs between ranks' states")
        floor = min(p["epoch"] for p in per_rank)
        top = max(max([p["epoch"], *map(int, p["consumed"])]) for p in per_rank)
        merged: dict[str, dict[str, int]] = {}
        for epoch in range(floor, top + 1):
            entry: dict[int, int] = {}
            for rank, p in enumerate(per_rank):
                if p["epoch"] > epoch:  # this rank has finished all its shards of that epoch
                    entry.update((i, FULL) for i in rank_shards(src["num_shards"], seed, epoch, rank, dp_size))
                else:
                    entry.update((int(i), n) for i, n in p["consumed"].get(str(epoch), {}).items())
            if entry:
                merged[str(epoch)] = {str(i): entry[i] for i in sorted(entry)}
        sources.append({**{key: src[key] for key in ("name", "fingerprint", "num_shards")}, "epoch": floor, "consumed": merged})
    return {
        "version": STATE_VERSION,
        "kind": "global",
        "seed": seed,
        "split": first["split"],
        "sources": sources,
        "mixture": {"dp_size": dp_size, "draws": [s["draws"] for s in ordered],
                    "lane_draws": [s["lane_draws"] for s in ordered]},
    }


def _own_rank_state(state: dict[str, Any]) -> dict[str, Any]:
    """A rank's own state in the global form, for the same rank of the same layout."""
    draws, lanes = [0] * state["dp_size"], [[0] * len(state["sources"])] * state["dp_size"]
    draws[state["dp_rank"]], lanes[state["dp_rank"]] = state["draws"], state["lane_draws"]
    return {"version": STATE_VERSION, "kind": "global", "seed": state["seed"], "split": state["split"],
            "sources": state["sources"], "mixture": {"dp_size": state["dp_size"], "draws": draws, "lane_draws": lanes}}


def localize_state(
    state: dict[str, Any], sources: list[Source], seed: int, split: str, dp_rank: int, dp_size: int
) -> tuple[list[tuple[int, Consumed]], int, list[int]]:
    """This rank's share of a global state: per source (start epoch, consumed), the mixture draw
    count and, per source, the samples drawn (which choose the lane of the next one)."""
    if state.get("kind") == "rank" and state.get("version") == STATE_VERSION and state["dp_size"] > 1 \
            and (state["dp_rank"], state["dp_size"]) == (dp_rank, dp_size):
        state = _own_rank_state(state)  # a rank continuing from its own state: the others' do not matter
    elif state.get("kind") == "rank":
        state = merge_rank_states([state])  # only valid when it was a single-rank run
    if state.get("version") == 1:
        raise StateError("the checkpoint's data position was saved before documents were shuffled (loader state "
                         "version 1) and cannot be continued; start over in another run.dir, keeping its weights "
                         "with checkpoint.init_from=<that checkpoint>")
    if state.get("version") != STATE_VERSION or state.get("kind") != "global":
        raise StateError(f"unknown loader state (version {state.get('version')!r}); pass TokenLoader.merge_states(...) output")
    if state["seed"] != seed:
        raise StateError(f"state was saved with seed {state['seed']} but this loader has seed {seed}; construct it with seed={state['seed']}")
    if state["split"] != split:
        raise StateError(f"state is for split {state['split']!r} but this loader reads {split!r}")
    if len(state["sources"]) != len(sources):
        raise StateError(f"state has {len(state['sources'])} sources but this loader has {len(sources)}; use the same dataset mixture")
    result: list[tuple[int, Consumed]] = []
    for saved, source in zip(state["sources"], sources):
        if saved["fingerprint"] != source.fingerprint:
            raise StateError(
                f"{source.dir}: dataset differs from the one the state was saved on ({saved['name']}); "
                f"resume with the same dataset directory"
            )
        consumed: Consumed = {}
        for epoch_key, entries in saved["consumed"].items():
            epoch = int(epoch_key)
            mine = set(rank_shards(len(source.shards), seed, epoch, dp_rank, dp_size))
            for index_key, entry in entries.items():
                index = int(index_key)
                if index >= len(source.shards):
                    raise StateError(f"state names shard {index} but {source.name} has {len(source.shards)} shards")
                if index in mine:
                    consumed.setdefault(epoch, {})[index] = _decode_progress(entry)
        result.append((int(saved["epoch"]), consumed))
    mixture = state.get("mixture", {})
    if mixture.get("dp_size") != dp_size:  # another layout: lanes and mixture draws start afresh
        return result, 0, [0] * len(sources)
    return result, mixture["draws"][dp_rank], list(mixture["lane_draws"][dp_rank])
