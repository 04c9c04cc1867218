"""tools/plot.py turns metrics.jsonl into a PNG, and names a missing or corrupt file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import HUNG

REPO = Path(__file__).resolve().parent.parent


def test_plot_writes_png_of_loss_and_eval(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 9 - s * 0.1, "lr": 1e-3}) for s in range(1, 21)]
    lines.append(json.dumps({"step": 20, "eval_loss": 7.5}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "loss.png"
    proc = subprocess.run([sys.executable, "tools/plot.py", str(run), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=HUNG)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_names_a_corrupt_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n')
    proc = subprocess.run([sys.executable, "tools/plot.py", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=HUNG)
    assert proc.returncode != 0 and "metrics.jsonl:2" in proc.stderr
