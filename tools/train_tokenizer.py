#!/usr/bin/env python
"""Train a byte-level BPE tokenizer (HF tokenizers) on text files and write DIR/tokenizer.json.

Inputs are text files (one document each), .jsonl files (one document per line, in the "text"
field), or directories searched recursively for .txt .text .md .rst .py .jsonl files.
The special token <|endoftext|> (id 0) ends every document. Example:

    python tools/train_tokenizer.py --input corpus/ --vocab-size 32000 --out tok/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's pretrain, installed or not

from tokenizers import Tokenizer

from pretrain.data.manifest import DatasetError
from pretrain.data.tokenizer import train_tokenizer_from_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text/.jsonl files or directories to train on")
    parser.add_argument("--vocab-size", type=int, required=True, metavar="N",
                        help="vocabulary size including the 256 byte tokens and <|endoftext|> (>= 258)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory; refuses to replace an existing DIR/tokenizer.json")
    args = parser.parse_args(argv)
    try:
        path = train_tokenizer_from_files(args.input, args.vocab_size, args.out)
    except (DatasetError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = Tokenizer.from_file(str(path)).get_vocab_size()
    short = (f", fewer than --vocab-size {args.vocab_size}: the corpus has no more pairs to merge"
             if size < args.vocab_size else "")
    print(f"wrote {path} ({size} tokens{short})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
