#!/usr/bin/env python
"""Run lm-eval tasks on a checkpoint: the same tasks and adapter as eval.downstream_interval in training.

    python tools/downstream_eval.py runs/default                         # python_next_line, all items
    python tools/downstream_eval.py runs/default --tasks python_next_line --limit 100 --out scores.json
    torchrun --nproc_per_node=2 tools/downstream_eval.py runs/default --tp 2   # any TP x DP layout

CKPT may be a step directory, a run's checkpoints/ directory or a run directory. Tasks come from
pretrain/evals/tasks/ and --include-path (a directory of lm-eval task YAML); nothing is downloaded.
The model is built from the configuration stored in the checkpoint; prints one JSON object of
scores (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

try:
    import pretrain  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.checkpoint import CheckpointError, read_manifest, resolve  # noqa: E402
from pretrain.config import ConfigError, from_yaml, validate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--tasks", default="python_next_line", help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", default=None, help="extra directory of lm-eval task YAML")
    parser.add_argument("--limit", type=int, default=None, help="documents per task")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size / tp = DP size)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="also write the scores as JSON here")
    args = parser.parse_args(argv)

    from pretrain.data import load_tokenizer
    from pretrain.evals.downstream import evaluate_tasks, flatten
    from pretrain.evals.lm import PretrainLM
    from pretrain.parallel.groups import destroy
    from pretrain.train import build

    try:
        ckpt = resolve(args.ckpt)
        manifest = read_manifest(ckpt)
        from omegaconf import OmegaConf

        cfg = from_yaml(OmegaConf.to_yaml(OmegaConf.create(manifest["config"])))
    except (CheckpointError, KeyError) as err:
        print(f"{args.ckpt}: not a pretrain checkpoint with a stored configuration ({err})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="downstream-eval-") as tmp:
        cfg.run.dir = tmp  # build() writes config.yaml there; nothing else is kept
        cfg.checkpoint.resume, cfg.checkpoint.init_from, cfg.checkpoint.init_optimizer = False, str(ckpt), False
        cfg.logging.wandb, cfg.logging.tensorboard = "disabled", False
        cfg.parallel.tp, cfg.parallel.zero_stage, cfg.train.device = args.tp, 0, args.device
        try:
            validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
            trainer = build(cfg)
            lm = PretrainLM(trainer.engine.module, load_tokenizer(trainer.data_dir), max_length=cfg.model.max_seq_len,
                            device=trainer.dims.device, batch_size=args.batch_size)
            results = evaluate_tasks(lm, args.tasks.split(","), args.include_path, args.limit)
        except (ConfigError, CheckpointError) as err:
            print(str(err), file=sys.stderr)
            return 2
        finally:
            destroy()
    if results is not None and trainer.dims.is_main:
        scores = {"checkpoint": str(ckpt), "step": manifest["step"], **flatten(results)}
        print(json.dumps(scores, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(scores, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
