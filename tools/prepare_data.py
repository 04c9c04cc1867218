#!/usr/bin/env python
"""Tokenize text into WebDataset token shards plus manifest.json: a dataset directory for training.

Inputs are text files (one document each), JSONL files (.jsonl, .jsonl.gz, .jsonl.zst; one
document per line in --text-field), parquet files (column --text-field), directories saved by
Hugging Face `datasets` (save_to_disk), or directories searched recursively for those files and
.txt .text .md .rst .py. Each document is tokenized by --workers processes, <|endoftext|>
appended, and routed to the "val" split when a hash of its id (relative path, plus line or row
number) falls below --val-fraction, else to "train"; the val split is never empty and has at
least --min-val-shards shards. The output is byte-identical for any --workers. Work goes to
.<out>.partial and is renamed to --out when complete: an interrupted run, started again with
the same arguments, keeps its finished shards; an existing non-empty --out is refused and left
untouched. Example:

    python tools/prepare_data.py --input corpus/ --tokenizer tok/ --out data/corpus-v1 \\
        --val-fraction 0.01 --tokens-per-shard 16777216
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's pretrain, installed or not

from pretrain.data.manifest import DatasetError, read_manifest
from pretrain.data.prepare import DEFAULT_TOKENS_PER_SHARD, import_megatron, prepare_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-megatron", metavar="PREFIX", default=None,
                        help="import a Megatron-LM / GPT-NeoX indexed dataset PREFIX.bin + PREFIX.idx "
                             "(already tokenized with --tokenizer) instead of tokenizing --input")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="text/.jsonl files or directories to tokenize")
    parser.add_argument("--tokenizer", required=True, metavar="PATH",
                        help="tokenizer.json, a directory holding one, or an existing dataset directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="new dataset directory (must not exist or be empty)")
    parser.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                        help="fraction of documents held out for validation (default: 0.01)")
    parser.add_argument("--tokens-per-shard", type=int, default=DEFAULT_TOKENS_PER_SHARD, metavar="N",
                        help="close a shard once it holds N tokens; use smaller shards to give every "
                             f"DP rank at least one (default: {DEFAULT_TOKENS_PER_SHARD})")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="tokenizer processes (default: all cores); the output is the same for any N")
    parser.add_argument("--text-field", default="text", metavar="NAME",
                        help="JSONL field / parquet or datasets column holding the text (default: text)")
    parser.add_argument("--min-val-shards", type=int, default=8, metavar="N",
                        help="the val split gets at least N shards, one per DP rank that evaluates "
                             "(default: 8, a node's worth)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--val-tokens-per-shard", type=int, default=None, metavar="N",
                        help="shard size of the val split (default: --tokens-per-shard)")
    args = parser.parse_args(argv)
    try:
        if args.from_megatron:
            out = import_megatron(args.from_megatron, args.tokenizer, args.out, args.val_fraction,
                                  args.tokens_per_shard, args.min_val_shards)
        elif not args.input:
            parser.error("one of --input or --from-megatron is required")
        else:
            out = prepare_dataset(args.input, args.tokenizer, args.out, args.val_fraction,
                                  args.tokens_per_shard, args.val_tokens_per_shard, workers=args.workers,
                                  text_field=args.text_field, min_val_shards=args.min_val_shards,
                                  progress=not args.no_progress)
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
