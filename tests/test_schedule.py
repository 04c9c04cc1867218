"""Learning-rate schedules follow their formulas, and an annealing run forked from a stable run's
checkpoint continues that run exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, losses, run_distributed, train
from pretrain.config import ConfigError, OptimConfig, compose
from pretrain.schedule import learning_rate

PEAK, MIN_RATIO, WARMUP, STEPS = 1e-3, 0.1, 10, 100
LOW = PEAK * MIN_RATIO


def _curve(**kw) -> list[float]:
    cfg = OptimConfig(lr=PEAK, min_lr_ratio=MIN_RATIO, warmup_steps=WARMUP, **kw)
    return [learning_rate(s, cfg, STEPS) for s in range(STEPS)]


def _warmup(s: int) -> float:
    return PEAK * (s + 1) / WARMUP


def test_cosine_linear_constant_follow_their_formulas() -> None:
    for s, (cos, lin, const) in enumerate(zip(_curve(schedule="cosine"), _curve(schedule="linear"),
                                              _curve(schedule="constant"))):
        if s < WARMUP:
            assert cos == pytest.approx(_warmup(s)) and lin == pytest.approx(_warmup(s))
            continue
        p = (s - WARMUP) / (STEPS - WARMUP)
        assert cos == pytest.approx(LOW + 0.5 * (PEAK - LOW) * (1 + math.cos(math.pi * p)), rel=1e-12)
        assert lin == pytest.approx(PEAK - (PEAK - LOW) * p, rel=1e-12)
        assert const == PEAK


@pytest.mark.parametrize("shape, remaining", [
    ("linear", lambda p: 1 - p),
    ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ("1-sqrt", lambda p: 1 - math.sqrt(p)),
])
def test_wsd_holds_the_peak_then_decays_over_the_last_fraction(shape: str, remaining) -> None:
    curve = _curve(schedule="wsd", decay_fraction=0.25, decay_shape=shape)
    start = STEPS - 25
    for s, lr in enumerate(curve):
        if s < WARMUP:
            expected = _warmup(s)
        elif s < start:
            expected = PEAK
        else:
            expected = LOW + (PEAK - LOW) * remaining((s - start + 1) / 25)
        assert lr == pytest.approx(expected, rel=1e-12), f"step {s}"
    assert curve[start - 1] == PEAK and curve[start] < PEAK
    assert curve[-1] == pytest.approx(LOW, rel=1e-12)  # the last step trains at the floor
    assert all(a >= b for a, b in zip(curve[start:], curve[start + 1:]))  # monotone decay


def test_wsd_decay_start_step_overrides_the_fraction() -> None:
    curve = _curve(schedule="wsd", decay_fraction=0.25, decay_start_step=60, decay_shape="linear")
    assert curve[WARMUP:60] == [PEAK] * (60 - WARMUP)
    assert curve[60:] == pytest.approx([LOW + (PEAK - LOW) * (1 - (s - 59) / 40) for s in range(60, STEPS)])
    # A stable run is the same schedule with no decay inside its steps.
    assert _curve(schedule="wsd", decay_fraction=0.0)[WARMUP:] == [PEAK] * (STEPS - WARMUP)


@pytest.mark.parametrize("override, key", [
    ("optim.decay_shape=exp", "optim.decay_shape"),
    ("optim.decay_fraction=1.5", "optim.decay_fraction"),
    ("optim.decay_start_step=500", "optim.decay_start_step"),
    ("checkpoint.init_optimizer=true", "checkpoint.init_optimizer"),
])
def test_bad_schedule_settings_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(["optim.schedule=wsd", "train.max_steps=100", override])


BASE = TINY + ["optim=wsd", "optim.warmup_steps=2", "parallel.zero_stage=1", "checkpoint.keep_last=0"]


RUNS = {  # the reference decays from step 4 in one go; the stable run never decays and stops at step 4;
    # the annealing run forks the stable run's step-4 checkpoint
    "reference": ["optim.decay_start_step=4", "train.max_steps=8"],
    "stable": ["optim.decay_fraction=0", "train.max_steps=4"],
    "anneal": ["optim.decay_start_step=4", "train.max_steps=8",
               "checkpoint.init_from={root}/stable/checkpoints/step_00000004", "checkpoint.init_optimizer=true"],
}


def _run(root: str, name: str) -> list[dict]:
    return train(BASE + [o.format(root=root) for o in RUNS[name]], f"{root}/{name}")[0]


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("model-*.safetensors")) + sorted(ckpt.glob("optim-*.safetensors")):
        out.update(load_file(f))
    return out


def test_annealing_fork_continues_the_stable_run_exactly(tmp_path: Path) -> None:
    runs = {name: run_distributed(_run, 2, str(tmp_path), name)[0] for name in RUNS}
    ref, stable, anneal = runs["reference"], runs["stable"], runs["anneal"]
    # Same thread and process counts in all three runs, so equality is exact, not a tolerance.
    assert losses(stable) == losses(ref)[:4]
    assert [r["step"] for r in anneal] == [5, 6, 7, 8]
    assert [r["lr"] for r in anneal] == [r["lr"] for r in ref[4:]]
    assert anneal[-1]["lr"] == 0.0 and anneal[0]["lr"] < stable[-1]["lr"]
    assert losses(anneal) == losses(ref)[4:]
    a, b = _state(tmp_path / "reference/checkpoints/step_00000008"), _state(tmp_path / "anneal/checkpoints/step_00000008")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between the annealing fork and the reference"
