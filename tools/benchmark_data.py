#!/usr/bin/env python
"""Data pipeline throughput: the loader (tokens/s per process and over all cores, local shards and
through `pipe:cat`) and tools/prepare_data.py tokenization (tokens/s with 1 and N workers).

The loader reference is what an 8xH100 node training the 1b preset consumes, about 360K tokens/s;
the goal is 10x that per node. Examples:

    python tools/benchmark_data.py loader --epochs 3
    python tools/benchmark_data.py prepare --megabytes 50 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's pretrain

from pretrain.data import Manifest, ShardInfo, TokenLoader, prepare_embedded_corpus, read_manifest, write_manifest
from pretrain.data.prepare import prepare_dataset

NODE_REFERENCE = 360_000  # tokens/s an 8xH100 node consumes training the 1b preset


def _read(dataset: str, rank: int, ranks: int, epochs: float, seq_len: int, mbs: int, out) -> None:
    start = time.perf_counter()  # shard reads and decoding included: whole epochs are timed
    loader = TokenLoader(dataset, "train", seq_len, mbs, rank, ranks, seed=0)
    batches = max(1, int(epochs * read_manifest(dataset).num_tokens("train") / ranks / (seq_len * mbs)))
    it = iter(loader)
    for _ in range(batches):
        next(it)
    out.put((batches * seq_len * mbs, time.perf_counter() - start))


def loader_rate(dataset: str, processes: int, epochs: float, seq_len: int, mbs: int) -> float:
    """Total tokens/s of ``processes`` loader processes, each one DP rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_read, args=(dataset, r, processes, epochs, seq_len, mbs, out)) for r in range(processes)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(tokens / seconds for tokens, seconds in results)


def piped_copy(dataset: Path, where: Path) -> Path:
    """The same dataset with every shard named as a `pipe:cat <file>` command."""
    m = read_manifest(dataset)
    splits = {k: [ShardInfo(f"pipe:cat {dataset / s.file}", s.documents, s.tokens, s.sha256) for s in v]
              for k, v in m.splits.items()}
    where.mkdir()
    shutil.copy(dataset / "tokenizer.json", where / "tokenizer.json")
    write_manifest(where, Manifest(m.dtype, splits, m.tokenizer, m.metadata))
    return where


def bench_loader(args) -> dict:
    dataset = prepare_embedded_corpus(args.cache)
    cores = os.cpu_count() or 1
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        piped = piped_copy(dataset, Path(tmp) / "piped")
        for name, where in (("local", dataset), ("pipe:cat", piped)):
            for procs in sorted({1, cores}):
                rate = loader_rate(str(where), procs, args.epochs, args.seq_len, args.micro_batch_size)
                results[f"{name} x{procs}"] = rate
                print(f"loader {name:8s} {procs:2d} process(es): {rate:12,.0f} tokens/s | "
                      f"{rate / NODE_REFERENCE:6.1f}x an 8xH100 node on the 1b preset ({NODE_REFERENCE:,} tokens/s)",
                      flush=True)
    return results


def _export_corpus(path: Path, megabytes: int) -> int:
    """Python sources of this installation (stdlib first, then site-packages) as JSONL, up to ``megabytes``."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    size, limit = 0, megabytes * 1_000_000
    with open(path, "w") as out:
        for root in roots:
            for dirpath, dirnames, files in os.walk(root):
                dirnames.sort()
                for name in sorted(files):
                    if not name.endswith(".py"):
                        continue
                    try:
                        text = (Path(dirpath) / name).read_text(encoding="utf-8")
                    except (UnicodeDecodeError, OSError):
                        continue
                    line = json.dumps({"text": text}) + "\n"
                    out.write(line)
                    size += len(line)
                    if size >= limit:
                        return size
    return size


def bench_prepare(args) -> dict:
    dataset = prepare_embedded_corpus(args.cache)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        size = _export_corpus(corpus, args.megabytes)
        print(f"corpus: {size / 1e6:.1f} MB of JSONL ({corpus})", flush=True)
        for workers in args.workers:
            start = time.perf_counter()
            out = prepare_dataset([corpus], dataset, Path(tmp) / f"out{workers}", tokens_per_shard=1 << 22,
                                  workers=workers)
            seconds = time.perf_counter() - start
            tokens = sum(read_manifest(out).num_tokens(k) for k in ("train", "val"))
            results[workers] = tokens / seconds
            print(f"prepare_data --workers {workers}: {tokens:,} tokens in {seconds:.1f}s = {tokens / seconds:,.0f} "
                  f"tokens/s ({tokens / seconds / workers:,.0f} per worker)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.environ.get("PRETRAIN_CACHE", "~/.cache/pretrain"),
                        help="where the embedded corpus is built (its tokenizer is used for prepare)")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("loader", help="TokenLoader tokens/s")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the embedded corpus per run")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p = sub.add_parser("prepare", help="tools/prepare_data.py tokens/s")
    p.add_argument("--megabytes", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    (bench_loader if args.what == "loader" else bench_prepare)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
