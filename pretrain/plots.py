"""Training curves from metrics.jsonl: the library behind tools/plot.py.

Each panel shows one quantity for every run (one colour per run, named in the legend), against
optimizer steps or against tokens seen; runs with different batch sizes compare fairly only on
the second. Eval records carry only a step; their token count is read off the training records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


class MetricsError(ValueError):
    """A metrics file that is missing or unreadable; the message names it."""


# (field, axis label, scale applied to values); "loss" panels also draw eval_loss.
PANELS = [("loss", "loss (nats/token)", 1.0), ("eval_bpb", "eval bits per byte", 1.0),
          ("lr", "learning rate", 1.0), ("tokens_per_sec", "tokens/s", 1.0), ("mfu", "MFU (%)", 100.0)]


@dataclass
class Run:
    label: str
    records: list[dict[str, Any]]

    def series(self, field: str, x: str) -> tuple[list[float], list[float]]:
        """(xs, ys) of `field` against "step" or "tokens"; the last record of a step wins (after a resume)."""
        tokens_at = {r["step"]: r["consumed_tokens"] for r in self.records if "consumed_tokens" in r}
        points: dict[int, float] = {}
        for r in self.records:
            if field in r and r[field] is not None and "step" in r:
                points[r["step"]] = r[field]
        steps = sorted(s for s in points if x == "step" or s in tokens_at)
        return [float(s if x == "step" else tokens_at[s]) for s in steps], [points[s] for s in steps]


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.exists():
        raise MetricsError(f"{path} not found; pass a run directory that contains metrics.jsonl")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise MetricsError(f"{path}:{n} is not JSON; the file is corrupt") from None
    return records


def run_labels(runs: Sequence[Path]) -> list[str]:
    """The runs' directory names, with parents added until they are unique."""
    dirs = [r if r.is_dir() else r.parent for r in runs]
    depth = 1
    while True:
        labels = ["/".join(d.resolve().parts[-depth:]) for d in dirs]
        if len(set(labels)) == len(labels) or depth > 8:
            return labels
        depth += 1


def plot_runs(runs: Sequence[Path], out: Path, labels: Sequence[str] | None = None, metric: str | None = None) -> None:
    try:
        import matplotlib
    except ImportError:
        raise MetricsError('matplotlib is not installed; pip install -e ".[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    loaded = [Run(label, read_metrics(path)) for label, path in zip(labels or run_labels(runs), runs)]
    panels = [(metric, metric, 1.0)] if metric else [
        p for p in PANELS if any(p[0] in r for run in loaded for r in run.records)]
    if metric and not any(metric in r for run in loaded for r in run.records):
        fields = sorted({k for run in loaded for r in run.records for k, v in r.items()
                         if isinstance(v, (int, float)) and k != "step"})
        raise MetricsError(f"--metric {metric}: no record has it; the runs log {', '.join(fields)}")
    if not panels:
        raise MetricsError(f"no plottable fields in {', '.join(map(str, runs))}")
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 3.2 * len(panels)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (field, title, scale) in enumerate(panels):
        for col, x in enumerate(("step", "tokens")):
            ax = axes[row][col]
            for i, run in enumerate(loaded):
                colour = colours[i % len(colours)]
                xs, ys = run.series(field, x)
                marker = "o" if field.startswith("eval") else None
                if xs:
                    ax.plot(xs, [y * scale for y in ys], color=colour, marker=marker, markersize=4,
                            linewidth=1.2, label=f"{run.label} train" if field == "loss" else run.label)
                if field == "loss":
                    ex, ey = run.series("eval_loss", x)
                    if ex:
                        ax.plot(ex, ey, color=colour, linestyle="--", marker="o", markersize=4,
                                label=f"{run.label} eval")
            ax.set_ylabel(title)
            ax.set_xlabel("optimizer step" if x == "step" else "tokens seen")
            if x == "tokens":
                ax.xaxis.set_major_formatter(EngFormatter())
            if field == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            if field == "tokens_per_sec":
                ax.yaxis.set_major_formatter(EngFormatter())
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
    fig.suptitle("training curves: " + ", ".join(run.label for run in loaded), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out, dpi=100)
    plt.close(fig)
