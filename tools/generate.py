#!/usr/bin/env python
"""Sample text from a checkpoint or a Hugging Face export of one.

    python tools/generate.py runs/default --prompt "def fibonacci(n):" --max-new-tokens 80
    python tools/generate.py hf_out/ --prompt "import os" --temperature 0.8 --top-k 50 --seed 1

CKPT may be a step directory, a run's checkpoints/ directory, a run directory (its `latest`
checkpoint) or a Hugging Face Llama directory (from `convert_checkpoint.py to-hf`). The prompt
starts a new document (it follows <|endoftext|>, as documents do in training). --temperature 0
is greedy decoding: the same tokens as transformers' generate(do_sample=False) on the export.
Runs on the GPU when there is one (--device cpu to force the CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import pretrain  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pretrain.parallel  # noqa: E402,F401  (quiets megatron-core's import warnings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint, run directory or Hugging Face directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty, an unconditional sample)")
    parser.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature; 0 = greedy (default 0)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample among the likeliest tokens whose probabilities add up to P")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or dataset directory (default: the model's)")
    parser.add_argument("--ids", action="store_true", help="also print the generated token ids")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")

    from pretrain.checkpoint import CheckpointError
    from pretrain.data import DatasetError
    from pretrain.data.tokenizer import eos_id
    from pretrain.generate import generate, last_logits
    from pretrain.hf import ConversionError
    from pretrain.inference import load_model
    from pretrain.parallel.groups import destroy

    try:
        loaded = load_model(args.ckpt, args.device, args.tokenizer)
        if loaded.tokenizer is None:
            raise DatasetError(f"{args.ckpt}: no tokenizer found with the model; pass --tokenizer PATH")
        tok = loaded.tokenizer
        eos = eos_id(tok)
        prompt = [eos] + tok.encode(args.prompt, add_special_tokens=False).ids
        start = time.perf_counter()
        new = generate(last_logits(loaded.model), prompt, args.max_new_tokens,
                       loaded.model_config.get("max_seq_len", 4096), args.temperature, args.top_k, args.top_p,
                       args.seed, stop_id=eos, device=loaded.device)
        seconds = time.perf_counter() - start
    except (CheckpointError, ConversionError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy()
    text = tok.decode([t for t in new if t != eos])
    print(args.prompt + text)
    if args.ids:
        print("ids: " + " ".join(map(str, new)))
    print(f"[{len(new)} tokens in {seconds:.1f}s on {loaded.device.type}"
          + (", stopped at <|endoftext|>" if new and new[-1] == eos else "") + "]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
