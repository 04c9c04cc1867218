"""Datasets named by shard patterns in the config (``data.train_shards``), without a manifest.json.

The reader needs per-shard document and token counts and the token dtype, which a manifest
records. For shards named only by WebDataset brace patterns (local paths, ``pipe:`` commands,
http(s) URLs), every shard is read once and those counts are written as an ordinary manifest,
next to a copy of the tokenizer, in an index directory of the run (``run.dir/data-index``). The
rest of the pipeline reads that directory like any dataset; a restart finds the index and reads
no shard twice. Ranks index disjoint shards and gather the counts, so start-up reads each shard once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Protocol

from braceexpand import braceexpand

from pretrain.data.manifest import (
    MANIFEST_NAME, DatasetError, Manifest, ShardInfo, TokenizerInfo, is_url, read_location, read_manifest,
    write_manifest,
)
from pretrain.data.shards import ReadOptions, read_shard
from pretrain.data.tokenizer import TOKENIZER_FILE, EOS_TOKEN, eos_id

INDEX_DIR = "data-index"
Patterns = Optional[Any]  # a pattern string, or a list of them


class Gather(Protocol):
    """All ranks' values of ``value``, in rank order (every rank calls it; a collective)."""

    def __call__(self, value: Any) -> list[Any]: ...


def _alone(value: Any) -> list[Any]:
    return [value]


def expand_shards(patterns: Patterns, key: str) -> list[str]:
    """The shard locations a pattern (or list of patterns) names, in order; local paths made absolute
    ``file:`` URLs. A DatasetError naming ``key`` if they name nothing, or a shard twice."""
    items = [patterns] if isinstance(patterns, str) else list(patterns or [])
    urls: list[str] = []
    for pattern in items:
        if not isinstance(pattern, str) or not pattern.strip():
            raise DatasetError(f"{key}: {pattern!r} is not a shard pattern; give a path, pipe: command or URL "
                               f"such as /data/train-{{000000..000009}}.tar")
        expanded = [u for u in braceexpand(pattern) if u.strip()]
        if not is_url(pattern):
            local = [Path(u).absolute() for u in expanded]
            if not any(p.is_file() for p in local):
                raise DatasetError(f"{key}: pattern {pattern!r} matches no file (first: {local[0]}); "
                                   f"check the path and the {{first..last}} range")
            expanded = [p.as_uri() for p in local]
        urls += expanded
    if not urls:
        raise DatasetError(f"{key}: names no shards; give a pattern such as /data/train-{{000000..000009}}.tar")
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise DatasetError(f"{key}: names shard {url} twice; make the patterns disjoint")
        seen.add(url)
    return urls


def _read_tokenizer(location: str) -> bytes:
    if not is_url(location) and not Path(location).expanduser().is_file():
        raise DatasetError(f"data.tokenizer: {Path(location).expanduser()}: tokenizer file not found; set "
                           f"data.tokenizer to the tokenizer.json the shards were tokenized with")
    try:
        return read_location(location)
    except OSError as e:
        raise DatasetError(f"data.tokenizer: {location} cannot be read ({e}); check the URL") from None


def _tokenizer_info(data: bytes, location: str) -> TokenizerInfo:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(data.decode())
    except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise DatasetError(f"data.tokenizer: {location} is not a valid tokenizers JSON file ({e}); "
                           f"point it at the tokenizer.json the shards were tokenized with") from None
    return TokenizerInfo(TOKENIZER_FILE, tokenizer.get_vocab_size(), eos_id(tokenizer), EOS_TOKEN)


def index_shard(url: str, options: ReadOptions) -> tuple[int, int, str]:
    """(documents, tokens, dtype) of one shard, read once; a DatasetError naming it if unusable."""
    docs = read_shard(url, None, options)
    if not docs:
        raise DatasetError(f"{url}: shard holds no documents; leave it out of the pattern")
    dtypes = {d.dtype.name for d in docs}
    if len(dtypes) > 1:
        raise DatasetError(f"{url}: documents mix dtypes {sorted(dtypes)}; re-create the shard with tools/prepare_data.py")
    return len(docs), int(sum(d.size for d in docs)), dtypes.pop()


def _key(splits: dict[str, list[str]], tokenizer: str) -> dict[str, Any]:
    return {"shard_patterns": splits, "tokenizer_source": tokenizer}


def _cached(index_dir: Path, key: dict[str, Any]) -> bool:
    if not (index_dir / MANIFEST_NAME).is_file() or not (index_dir / TOKENIZER_FILE).is_file():
        return False
    try:
        return read_manifest(index_dir).metadata.get("index") == key
    except DatasetError:
        return False  # a damaged index is rebuilt


def pattern_dataset(
    train: Patterns,
    val: Patterns,
    tokenizer: str | None,
    index_dir: str | Path,
    options: ReadOptions = ReadOptions(),
    rank: int = 0,
    world_size: int = 1,
    gather: Gather = _alone,
    dp_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """The index directory of the dataset ``train``/``val`` patterns name: a manifest.json with every
    shard's counts and a copy of the tokenizer, built once (rank r reads shards r, r + world_size, ...)
    and reused while the patterns and tokenizer stay the same. All ranks call it."""
    if not tokenizer:
        raise DatasetError("data.tokenizer: shard patterns need the tokenizer.json the shards were tokenized with; "
                           "set data.tokenizer=/path/to/tokenizer.json")
    splits = {"train": expand_shards(train, "data.train_shards")}
    if val:
        splits["val"] = expand_shards(val, "data.val_shards")
        both = set(splits["train"]) & set(splits["val"])
        if both:
            raise DatasetError(f"data.val_shards: shard {min(both)} is also in data.train_shards; "
                               f"held-out data must not be trained on")
    for split, urls in splits.items():
        if len(urls) < dp_size:
            raise DatasetError(f"data.{split}_shards names {len(urls)} shards but dp_size is {dp_size}; each DP rank "
                               f"needs its own: name at least {dp_size} shards, or use fewer DP ranks")
    index_dir = Path(index_dir)
    key = _key(splits, str(tokenizer))
    if all(gather(_cached(index_dir, key))):
        return index_dir
    data = _read_tokenizer(str(tokenizer))
    info = _tokenizer_info(data, str(tokenizer))
    options = ReadOptions(None, info.vocab_size, options.timeout, options.retries, options.backoff)
    work = [(split, i, url) for split, urls in splits.items() for i, url in enumerate(urls)][rank::world_size]
    mine, error = {}, None
    for split, i, url in work:
        try:
            mine[f"{split}/{i}"] = index_shard(url, options)
        except DatasetError as e:
            error = str(e)
            break
    results = gather((mine, error))
    errors = [e for _, e in results if e]
    if errors:
        raise DatasetError(errors[0])
    counts = {k: v for part, _ in results for k, v in part.items()}
    dtypes = {counts[f"{s}/{i}"][2] for s, urls in splits.items() for i in range(len(urls))}
    if len(dtypes) > 1:
        raise DatasetError(f"the shards mix token dtypes {sorted(dtypes)}; name shards of one dataset only")
    if rank == 0:
        index_dir.mkdir(parents=True, exist_ok=True)
        tmp = index_dir / f".{TOKENIZER_FILE}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, index_dir / TOKENIZER_FILE)
        manifest = Manifest(
            dtype=dtypes.pop(),
            splits={s: [ShardInfo(url, *counts[f"{s}/{i}"][:2], sha256="") for i, url in enumerate(urls)]
                    for s, urls in splits.items()},
            tokenizer=info,
            metadata={"index": key, "note": "built from data.train_shards / data.val_shards; sha256 not recorded"},
        )
        write_manifest(index_dir, manifest)
    barrier()
    return index_dir


def run_pattern_dataset(data_cfg: Any, run_dir: str | Path, dp_size: int) -> Path:
    """pattern_dataset for a training run: every rank of the default process group takes part."""
    import torch.distributed as dist

    options = ReadOptions(timeout=data_cfg.timeout, retries=data_cfg.retries)
    kwargs: dict[str, Any] = {}
    if dist.is_available() and dist.is_initialized():
        def gather(value: Any) -> list[Any]:
            out: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(out, json.loads(json.dumps(value)))
            return out

        kwargs = dict(rank=dist.get_rank(), world_size=dist.get_world_size(), gather=gather, barrier=dist.barrier)
    return pattern_dataset(data_cfg.train_shards, data_cfg.val_shards, data_cfg.tokenizer,
                           Path(run_dir) / INDEX_DIR, options, dp_size=dp_size, **kwargs)
