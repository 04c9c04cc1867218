#!/usr/bin/env python
"""Training curves of one or more runs, overlaid, from their metrics.jsonl, into one PNG.

    python tools/plot.py runs/default --out curves.png
    python tools/plot.py runs/a runs/b --labels "lr 3e-3" "lr 1e-3" --out compare.png
    python tools/plot.py runs/default --metric grad_norm --out grad_norm.png

By default the figure has a row per quantity (loss with eval loss, eval bits per byte when the
runs have it, learning rate, tokens/s, MFU) and two columns: against optimizer steps and against
tokens seen. The legend names each run (its directory, or --labels). Needs matplotlib:
`pip install -e ".[plot]"`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import pretrain  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.plots import MetricsError, plot_runs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write (default curves.png)")
    p.add_argument("--labels", nargs="+", help="legend names, one per run (default: the run directories' names)")
    p.add_argument("--metric", help="plot only this metrics.jsonl field (loss, lr, grad_norm, mfu, ...)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f"--labels: got {len(args.labels)} names for {len(args.runs)} runs")
    try:
        plot_runs(args.runs, args.out, labels=args.labels, metric=args.metric)
    except MetricsError as err:
        print(f"plot: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
