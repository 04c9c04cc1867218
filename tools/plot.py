"""Plot loss curves (and eval loss) from one or more runs' metrics.jsonl into a PNG.

    python tools/plot.py runs/default runs/zero3 --out loss.png
    python tools/plot.py runs/default --metric tokens_per_sec --out tps.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.exists():
        raise SystemExit(f"plot: {path} not found; pass a run directory that contains metrics.jsonl")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise SystemExit(f"plot: {path}:{n} is not JSON; the file is corrupt") from None
    return records


def plot(runs: list[Path], out: Path, metric: str = "loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        records = read_metrics(run)
        rows = [r for r in records if metric in r]
        ax.plot([r["step"] for r in rows], [r[metric] for r in rows], label=f"{run.name} {metric}")
        if metric == "loss":
            evals = [r for r in records if "eval_loss" in r]
            if evals:
                ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--",
                        label=f"{run.name} eval_loss")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", type=Path, default=Path("loss.png"), help="PNG to write")
    p.add_argument("--metric", default="loss", help="metrics.jsonl field to plot (loss, lr, grad_norm, ...)")
    args = p.parse_args(argv)
    plot(args.runs, args.out, args.metric)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
