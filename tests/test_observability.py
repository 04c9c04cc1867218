"""profile.steps writes a Chrome trace of exactly those steps; logging.tensorboard writes the same
numbers as metrics.jsonl to TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TINY, run_distributed, train
from pretrain.config import ConfigError, compose


def _run(run_dir: str) -> list[dict]:
    return train(TINY + ["train.max_steps=4", "profile.steps=[2,3]", "logging.tensorboard=true"], run_dir)[0]


def test_profiler_trace_and_tensorboard_events(tmp_path: Path) -> None:
    records = run_distributed(_run, 1, str(tmp_path))[0]

    trace = json.loads((tmp_path / "profile" / "trace_steps_2-3_rank0.json").read_text())
    events = trace["traceEvents"]
    names = {e.get("name") for e in events}
    assert "aten::mm" in names or "aten::addmm" in names  # the model's matmuls were recorded
    # Both optimizer steps of the window were recorded (torch marks each step with two nested events).
    assert sum(1 for e in events if e.get("name", "").startswith("Optimizer.step#AdamW")) >= 2
    top = (tmp_path / "profile" / "top_ops_steps_2-3_rank0.txt").read_text()
    assert "Self CPU" in top and "aten::" in top

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_sec"} <= set(acc.Tags()["scalars"])
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    assert logged.keys() == {1, 2, 3, 4}
    for r in records:  # TensorBoard stores float32
        assert logged[r["step"]] == pytest.approx(r["loss"], rel=1e-6)


def test_bad_profile_window_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"profile\.steps"):
        compose(["profile.steps=[5,2]"])
