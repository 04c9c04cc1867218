#!/usr/bin/env python
"""Convert and inspect pretrain checkpoints.

Commands:
  to-hf CKPT OUT      export as a Hugging Face directory: config.json (the config of the
                      architecture the model switches name: LlamaForCausalLM, Qwen2ForCausalLM
                      with model.qkv_bias, Qwen3ForCausalLM with model.qk_norm=head,
                      Olmo2ForCausalLM with model.qk_norm=full model.norm_placement=post; with this
                      model's sizes, rope_theta, rms_norm_eps, GQA heads, tied embeddings),
                      safetensors weights with `model.` prefixes and lm_head, and the run's
                      tokenizer, so that AutoTokenizer/AutoModelForCausalLM.from_pretrained(OUT)
                      work. OUT must not exist or be empty.
  from-hf HF_DIR CKPT import a local Hugging Face Llama, Qwen2/Qwen2.5, Qwen3 or OLMo 2 directory
                      (safetensors; no sliding window, no o_proj/MLP biases; plain or Llama 3 RoPE)
                      as a weights-only checkpoint at step 0 with no optimizer state. Train from
                      it with `checkpoint.init_from=CKPT` and the model overrides this command prints.
  inspect CKPT        print the manifest summary: step, consumed tokens, the layout it was saved
                      from, the model, every tensor's shape and bytes, and the files.

CKPT may be a step directory, a run's checkpoints/ directory or a run directory (the checkpoint
`latest` names is used). Checkpoints are layout-independent: any TP x DP x ZeRO layout loads them,
so no resharding command is needed. DeepSpeed-native checkpoints are not read: pretrain never
writes them. Examples:

    python tools/convert_checkpoint.py inspect runs/default
    python tools/convert_checkpoint.py to-hf runs/default hf-out/
    python tools/convert_checkpoint.py from-hf path/to/llama-dir imported/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import pretrain  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors import SafetensorError  # noqa: E402
from pretrain.checkpoint import CheckpointError, read_manifest, resolve
from pretrain.checkpoint.offline import model_overrides, summary, summary_json
from pretrain.data.manifest import DatasetError
from pretrain.hf import ConversionError, from_hf, to_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("to-hf", help="export a checkpoint as a Hugging Face directory")
    p.add_argument("ckpt", metavar="CKPT", help="step directory, checkpoints/ directory or run directory")
    p.add_argument("out", metavar="OUT", help="new (or empty) output directory")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the exported weights (default fp32, exactly the checkpoint's values)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="dataset directory or tokenizer.json to export (default: the checkpoint's copy, "
                        "else the dataset directory its manifest names)")
    p.add_argument("--no-tokenizer", action="store_true", help="export weights and config only")

    p = commands.add_parser("from-hf", help="import a local Hugging Face Llama, Qwen2, Qwen3 or OLMo 2 model as a checkpoint")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and safetensors weights")
    p.add_argument("ckpt", metavar="CKPT", help="new (or empty) checkpoint directory to write")

    p = commands.add_parser("inspect", help="print a checkpoint's manifest summary, tensors and files")
    p.add_argument("ckpt", metavar="CKPT", help="step directory, checkpoints/ directory or run directory")
    p.add_argument("--verify", action="store_true", help="also check every file's size and sha256")
    p.add_argument("--json", action="store_true", help="print the manifest (without the resolved config) as JSON")

    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            out = to_hf(args.ckpt, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                        with_tokenizer=not args.no_tokenizer)
            print(f"wrote {out}")
        elif args.command == "from-hf":
            out = from_hf(args.hf_dir, args.ckpt)
            print(f"wrote {out}\ntrain from it with: checkpoint.init_from={out} "
                  + " ".join(model_overrides(read_manifest(out)["model"])))
        else:
            ckpt = resolve(args.ckpt)
            print(summary_json(ckpt) if args.json else summary(ckpt, verify=args.verify))
    except (CheckpointError, ConversionError, DatasetError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as err:  # e.g. a full disk: the partial output was already removed
        print(f"error: writing failed ({err}); the partial output was removed and the input is unchanged",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
