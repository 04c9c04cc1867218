#!/usr/bin/env python
"""Held-out loss, perplexity and bits per byte of a checkpoint, on a dataset split or on raw text.

    python tools/evaluate.py runs/default                          # the run's own val split
    python tools/evaluate.py runs/default --data data/my_corpus --split val --batches 50
    python tools/evaluate.py runs/default --data notes/ README.md --json
    python tools/evaluate.py runs/default --tasks python_next_line --limit 100   # lm-eval tasks

With --tasks the checkpoint runs lm-eval tasks instead, exactly as tools/downstream_eval.py (and
eval.downstream_interval in training) does; every other option is then downstream_eval.py's.

CKPT may be a step directory, a run's checkpoints/ or run directory, or a Hugging Face export.
--data is a dataset directory (from prepare_data.py; default: the run's own) or text/.jsonl files
and directories, read as tools/prepare_data.py reads them. On a dataset the batches are the ones
the run evaluates (train.seq_len, train.micro_batch_size, train.eval_batches per data-parallel
rank, seed), so the loss reproduces the run's eval_loss at that step; raw text is cut into
consecutive windows of train.seq_len and every token after the first is scored once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import pretrain  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pretrain.parallel  # noqa: E402,F401  (quiets megatron-core's import warnings)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--tasks" or a.startswith("--tasks=") for a in argv):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from downstream_eval import main as downstream_main

        return downstream_main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint, run directory or Hugging Face directory")
    parser.add_argument("--data", nargs="+", metavar="DATASET_OR_TEXT",
                        help="a dataset directory, or text/.jsonl files and directories (default: the run's dataset)")
    parser.add_argument("--split", default="val", help="dataset split (default val)")
    parser.add_argument("--batches", type=int, metavar="N", help="micro-batches per DP rank (default: the run's "
                        "train.eval_batches)")
    parser.add_argument("--seq-len", type=int, metavar="N", help="tokens per sequence (default: the run's)")
    parser.add_argument("--micro-batch-size", type=int, metavar="N", help="sequences per batch (default: the run's)")
    parser.add_argument("--dp", type=int, metavar="N", help="data-parallel ranks to emulate (default: the run's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer for raw text (default: the model's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--tasks", metavar="NAMES", help="run lm-eval tasks instead (the rest of the command "
                        "goes to tools/downstream_eval.py; see its --help)")
    parser.add_argument("--limit", type=int, metavar="N", help="with --tasks: documents per task")
    args = parser.parse_args(argv)

    from pretrain.checkpoint import CheckpointError
    from pretrain.data import DatasetError
    from pretrain.data.manifest import MANIFEST_NAME
    from pretrain.data.text import iter_documents
    from pretrain.data.tokenizer import eos_id
    from pretrain.evaluation import dataset_batches, evaluate_batches, text_windows, token_byte_lengths
    from pretrain.hf import ConversionError
    from pretrain.inference import load_model
    from pretrain.parallel.groups import destroy

    try:
        loaded = load_model(args.ckpt, args.device, args.tokenizer)
        run = loaded.run_config
        train = run.get("train", {})
        seq_len = args.seq_len or train.get("seq_len") or 128
        data = args.data
        if data is None:
            dataset = (loaded.manifest or {}).get("tokenizer", {}).get("dataset_dir")
            if not dataset or not Path(dataset).is_dir():
                raise DatasetError(f"{args.ckpt}: records no dataset that still exists; pass --data DATASET_OR_TEXT")
            data = [dataset]
        is_dataset = len(data) == 1 and (Path(data[0]) / MANIFEST_NAME).is_file()
        if is_dataset:
            from pretrain.data import load_tokenizer

            tokenizer = load_tokenizer(data[0])
            dp = args.dp or (loaded.manifest or {}).get("layout", {}).get("dp") or 1
            batches = args.batches or train.get("eval_batches") or 4
            micro = args.micro_batch_size or train.get("micro_batch_size") or 8
            windows = dataset_batches(data[0], args.split, seq_len, micro, dp, batches, train.get("seed", 1234))
            what = {"data": str(data[0]), "split": args.split, "dp": dp, "batches": batches, "micro_batch_size": micro}
        else:
            tokenizer = loaded.tokenizer
            if tokenizer is None:
                raise DatasetError(f"{args.ckpt}: no tokenizer found with the model; pass --tokenizer PATH")
            eos = eos_id(tokenizer)
            docs = (tokenizer.encode(text, add_special_tokens=False).ids for _, text in iter_documents(data))
            windows = text_windows(docs, eos, seq_len)
            what = {"data": [str(d) for d in data]}
        model = loaded.model
        byte_lengths = token_byte_lengths(tokenizer, loaded.model_config["vocab_size"])
        result = evaluate_batches(lambda i, l, p: model(i, l, p), windows, byte_lengths, loaded.device).result()
    except (CheckpointError, ConversionError, DatasetError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy()
    step = (loaded.manifest or {}).get("step")
    if args.json:
        print(json.dumps({"checkpoint": str(loaded.source), "step": step, "seq_len": seq_len, **what,
                          **result.as_dict()}))
    else:
        print(f"{loaded.source} (step {step}) on {what['data']}" + (f" split {args.split}" if is_dataset else ""))
        print(f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:,.2f} | "
              f"{result.bits_per_byte:.4f} bits/byte | {result.tokens:,} tokens, {result.bytes:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
