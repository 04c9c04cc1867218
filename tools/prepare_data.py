#!/usr/bin/env python
"""Tokenize text into WebDataset token shards plus manifest.json: a dataset directory for training.

Inputs are text files (one document each), .jsonl files (one document per line, in the "text"
field), or directories searched recursively for .txt .text .md .rst .py .jsonl files. Each
document is tokenized, <|endoftext|> appended, and routed to the "val" split when a hash of its
id (relative path, plus line number for .jsonl) falls below --val-fraction, else to "train".
The output directory is written under a temporary name and renamed when complete; an existing
non-empty --out is refused and left untouched. Example:

    python tools/prepare_data.py --input corpus/ --tokenizer tok/ --out data/corpus-v1 \\
        --val-fraction 0.01 --tokens-per-shard 16777216
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import pretrain  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.data.manifest import DatasetError, read_manifest
from pretrain.data.prepare import DEFAULT_TOKENS_PER_SHARD, prepare_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text/.jsonl files or directories to tokenize")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="tokenizer.json, a directory holding one, or an existing dataset directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="new dataset directory (must not exist or be empty)")
    parser.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                        help="fraction of documents held out for validation (default: 0.01)")
    parser.add_argument("--tokens-per-shard", type=int, default=DEFAULT_TOKENS_PER_SHARD, metavar="N",
                        help="close a shard once it holds N tokens; use smaller shards to give every "
                             f"DP rank at least one (default: {DEFAULT_TOKENS_PER_SHARD})")
    parser.add_argument("--val-tokens-per-shard", type=int, default=None, metavar="N",
                        help="shard size of the val split (default: --tokens-per-shard)")
    args = parser.parse_args(argv)
    try:
        out = prepare_dataset(args.input, args.tokenizer, args.out, args.val_fraction,
                              args.tokens_per_shard, args.val_tokens_per_shard)
    except (DatasetError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest = read_manifest(out)
    for split, shards in manifest.splits.items():
        print(f"{split}: {len(shards)} shards, {sum(s.documents for s in shards)} documents, "
              f"{sum(s.tokens for s in shards)} tokens")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
