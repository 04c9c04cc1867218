"""A checkpoint saved in any TP x DP x ZeRO layout resumes in any other.

Five layouts each train STEPS steps (saving at SAVE_AT) on synthetic batches that are the same
global batch in every layout. Each checkpoint is then resumed in its own layout (the next losses
must be bit-exact) and in layouts with another TP size and another ZeRO stage (within fp32
reduction-order noise). Right after each load the resumed run gathers its weights and Adam
moments into a fresh checkpoint, which must equal the loaded one exactly.

One launch per world size runs several layouts one after another (the TP x DP grid is rebuilt in
between), because starting processes costs more than the tiny models' training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import TINY, SyntheticBatches, losses, run_distributed

pytestmark = pytest.mark.slow  # one matrix of launches, a few minutes on 2 cores
STEPS, SAVE_AT = 6, 3
CURVE_TOL = 1e-4  # fp32 reduction-order noise over 3 steps on this model, as in test_zero.py
# lr 1e-2 so that three steps move the loss well beyond the tolerance: a resume that lost the
# moments or the Adam step count would show in the curve.
BASE = TINY + [f"train.max_steps={STEPS}", "checkpoint.keep_last=0", "optim.lr=1e-2"]

# name: (world size, overrides). Every layout sees the same global batch of 4 sequences: the
# synthetic micro-batches of two virtual DP ranks, one each on DP=2, both on DP=1.
LAYOUTS = {
    "tp1-dp1-z0": (1, ["parallel.tp=1", "parallel.zero_stage=0", "train.micro_batch_size=4"]),
    "tp1-dp2-z1": (2, ["parallel.tp=1", "parallel.zero_stage=1", "train.micro_batch_size=2"]),
    "tp1-dp2-z3": (2, ["parallel.tp=1", "parallel.zero_stage=3", "train.micro_batch_size=2"]),
    # Unfused q/k/v and gate/up: checkpoints of fused and unfused models are interchangeable.
    "tp2-dp1-z0": (2, ["parallel.tp=2", "parallel.zero_stage=0", "train.micro_batch_size=4",
                       "model.fused_qkv=false", "model.fused_mlp=false"]),
    "tp2-dp2-z1": (4, ["parallel.tp=2", "parallel.zero_stage=1", "train.micro_batch_size=2"]),
}
# Every saved layout resumes in itself, in another TP size and in another ZeRO stage. Chosen so
# that only the cheap world-1 layout needs a second launch (4 processes on 2 cores are slow).
RESUMES = [  # (saved in, resumed in)
    ("tp1-dp1-z0", "tp1-dp1-z0"), ("tp1-dp1-z0", "tp2-dp1-z0"), ("tp1-dp1-z0", "tp1-dp2-z1"),
    ("tp1-dp1-z0", "tp2-dp2-z1"),
    ("tp1-dp2-z1", "tp1-dp2-z1"), ("tp1-dp2-z1", "tp2-dp1-z0"), ("tp1-dp2-z1", "tp1-dp2-z3"),
    ("tp1-dp2-z3", "tp1-dp2-z3"), ("tp1-dp2-z3", "tp2-dp1-z0"), ("tp1-dp2-z3", "tp1-dp2-z1"),
    ("tp2-dp1-z0", "tp2-dp1-z0"), ("tp2-dp1-z0", "tp1-dp2-z1"), ("tp2-dp1-z0", "tp1-dp1-z0"),
    ("tp2-dp2-z1", "tp2-dp2-z1"), ("tp2-dp2-z1", "tp1-dp1-z0"), ("tp2-dp2-z1", "tp1-dp2-z3"),
]


class ResumableSynthetic(SyntheticBatches):
    """SyntheticBatches that records how many batches it has served and resumes there."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0

    def __iter__(self):
        batches = super().__iter__()
        for _ in range(self.served):
            next(batches)
        for batch in batches:
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"synthetic_batches": self.served}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        assert all(s == states[0] for s in states), states
        return states[0]

    def load_state_dict(self, state: dict) -> None:
        self.served = state["synthetic_batches"]


def _run(layout: str, run_dir: Path, resume_from: Path | None = None) -> dict:
    """Train `layout` in this process (one rank of a launch) to STEPS; resume from a checkpoint
    directory if given. Returns losses and, after a resume, the path of the re-gathered copy."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from pretrain import checkpoint
    from pretrain.config import compose
    from pretrain.parallel.engine import base_optimizer
    from pretrain.train import build, resume

    world, overrides = LAYOUTS[layout]
    if parallel_state.model_parallel_is_initialized():  # the previous layout's grid
        parallel_state.destroy_model_parallel()
    torch.compiler.reset()  # and its compiled blocks (see helpers.train)
    interval = SAVE_AT if resume_from is None else 0
    cfg = compose([*BASE, *overrides, f"run.dir={run_dir}", f"checkpoint.interval={interval}",
                   "checkpoint.resume=false"], world_size=world)
    trainer = build(cfg)
    ranks = [trainer.dims.dp_rank] if trainer.dims.dp == 2 else [0, 1]
    trainer.loader = ResumableSynthetic(cfg.model.vocab_size, cfg.train.seq_len, 2, ranks, seed=cfg.train.seed)
    out: dict = {}
    if resume_from is not None:
        ckpts = run_dir / "checkpoints"
        if trainer.dims.is_main:
            shutil.rmtree(ckpts, ignore_errors=True)
            shutil.copytree(resume_from, ckpts / resume_from.name)
            (ckpts / "latest").write_text(resume_from.name + "\n")
        dist.barrier()
        cfg.checkpoint.resume = True
        resume(trainer)  # the real resume path, with the synthetic loader in place
        assert trainer.step == SAVE_AT
        adam_steps = {float(s["step"]) for s in base_optimizer(trainer.engine).state.values()}
        assert adam_steps == {float(SAVE_AT)}, adam_steps  # bias correction continues, not restarts
        copy_root = run_dir / "regathered"
        out["regathered"] = str(checkpoint.save(trainer.engine, copy_root, trainer.step,
                                                {"optimizer_step": trainer.step, "model": {}}, keep_last=0))
    out["losses"] = losses(trainer.run())
    return out


def _launch(jobs: list[tuple[str, str, str | None]]) -> list[dict]:
    return [_run(layout, Path(run_dir), Path(src) if src else None) for layout, run_dir, src in jobs]


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    out = {}
    for name, info in manifest["tensors"].items():
        with safe_open(str(ckpt / info["file"]), framework="pt") as f:
            out[name] = f.get_tensor(name)
        with safe_open(str(ckpt / info["optim_file"]), framework="pt") as f:
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{key}"] = f.get_tensor(f"{name}.{key}")
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    """Run every save and resume, a few launches in all: one per world size, then one more for
    the resumes whose checkpoint came from a later launch."""
    root = tmp_path_factory.mktemp("layouts")

    def ckpt(src: str) -> str:
        return str(root / f"save-{src}" / "checkpoints" / f"step_{SAVE_AT:08d}")

    saved: dict[str, dict] = {}
    results: dict[tuple[str, str], dict] = {}
    for world in (1, 4, 2, 1, 4):
        saves = [name for name, (w, _) in LAYOUTS.items() if w == world and name not in saved]
        ready = set(saved) | set(saves)
        resumes = [(src, dst) for src, dst in RESUMES
                   if LAYOUTS[dst][0] == world and src in ready and (src, dst) not in results]
        if not saves and not resumes:
            continue
        jobs = [(name, str(root / f"save-{name}"), None) for name in saves]
        jobs += [(dst, str(root / f"resume-{src}-to-{dst}"), ckpt(src)) for src, dst in resumes]
        outs = run_distributed(_launch, world, jobs)[0]
        saved.update(zip(saves, outs))
        results.update(zip(resumes, outs[len(saves):]))
    assert len(results) == len(RESUMES)
    return {"saved": saved, "results": results, "ckpt": ckpt}


@pytest.mark.parametrize("src,dst", RESUMES, ids=[f"{s}-to-{d}" for s, d in RESUMES])
def test_resume_in_any_layout(matrix, src: str, dst: str) -> None:
    reference = matrix["saved"][src]["losses"]
    assert len(reference) == STEPS
    assert max(reference) - min(reference) > 100 * CURVE_TOL  # the curve moves far beyond the tolerance
    result = matrix["results"][(src, dst)]
    # Weights and Adam moments gathered from the resumed layout equal the checkpoint exactly.
    loaded, regathered = _tensors(Path(matrix["ckpt"](src))), _tensors(Path(result["regathered"]))
    assert loaded.keys() == regathered.keys()
    for name, value in loaded.items():
        assert torch.equal(value, regathered[name]), f"{name} differs after loading {src} into {dst}"
    resumed = result["losses"]
    assert len(resumed) == STEPS - SAVE_AT
    if src == dst:  # test_resume_is_bit_exact
        assert resumed == reference[SAVE_AT:], f"{src}: resumed {resumed} vs uninterrupted {reference[SAVE_AT:]}"
    else:
        diffs = [abs(a - b) for a, b in zip(resumed, reference[SAVE_AT:])]
        print(f"{src} -> {dst}: max loss difference {max(diffs):.2e}")
        assert max(diffs) < CURVE_TOL, f"{src} -> {dst}: resumed {resumed} vs saved curve {reference[SAVE_AT:]}"


def test_save_layouts_agree(matrix) -> None:
    """The five layouts train the same model on the same global batches: the curves agree."""
    curves = {name: out["losses"] for name, out in matrix["saved"].items()}
    first = curves["tp1-dp1-z0"]
    for name, curve in curves.items():
        assert max(abs(a - b) for a, b in zip(curve, first)) < CURVE_TOL, f"{name}: {curve} vs {first}"
