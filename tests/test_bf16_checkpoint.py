"""bf16 checkpoints under every ZeRO stage: save, resume and `init_from` keep the fp32 master
weights and the Adam moments, whichever DeepSpeed wrapper holds them.

bf16 without ZeRO is autocast over fp32 weights in the plain engine (pretrain.precision: the
weights are their own master); ZeRO-1 with fp32 gradient accumulation is DeepSpeed's BF16
optimizer; ZeRO-2/3 its ZeRO optimizers. All four run here on CPU with gloo, on two ranks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY, losses, run_distributed
from test_checkpoint_layouts import ResumableSynthetic, _tensors

STEPS, SAVE_AT = 4, 2
BASE = TINY + ["train.precision=bf16", "checkpoint.keep_last=0", "optim.lr=1e-2"]


def _build(overrides: list[str], run_dir: Path, base: list[str] = BASE):
    from megatron.core import parallel_state

    from pretrain.config import compose
    from pretrain.train import build

    if parallel_state.model_parallel_is_initialized():  # the previous stage's grid
        parallel_state.destroy_model_parallel()
    cfg = compose([*base, *overrides, f"run.dir={run_dir}"], world_size=int(os.environ["WORLD_SIZE"]))
    trainer = build(cfg)
    trainer.loader = ResumableSynthetic(cfg.model.vocab_size, cfg.train.seq_len, cfg.train.micro_batch_size,
                                        [trainer.dims.dp_rank], seed=cfg.train.seed)
    return cfg, trainer


def _regather(trainer, root: Path) -> str:
    from pretrain import checkpoint

    return str(checkpoint.save(trainer.engine, root, trainer.step, {"optimizer_step": trainer.step, "model": {}},
                               keep_last=0))


def _stage(stage: int, root: Path, base: list[str] = BASE) -> dict:
    """Train, resume from the middle, and start a new run from the end, all at one ZeRO stage."""
    import torch.distributed as dist

    from pretrain.train import resume

    stage_args = [f"parallel.zero_stage={stage}"]
    out: dict = {}
    _, trainer = _build([*stage_args, f"train.max_steps={STEPS}", f"checkpoint.interval={SAVE_AT}"],
                        root / "full", base)
    out["optimizer"] = type(trainer.engine.optimizer).__name__
    out["full"] = losses(trainer.run())

    saved = root / "full" / "checkpoints" / f"step_{SAVE_AT:08d}"
    resumed_dir = root / "resumed"
    cfg, trainer = _build([*stage_args, f"train.max_steps={STEPS}", "checkpoint.interval=0",
                           "checkpoint.resume=false"], resumed_dir, base)
    if trainer.dims.is_main:
        shutil.copytree(saved, resumed_dir / "checkpoints" / saved.name)
        (resumed_dir / "checkpoints" / "latest").write_text(saved.name + "\n")
    dist.barrier()
    cfg.checkpoint.resume = True
    resume(trainer)
    out["resumed_regathered"] = _regather(trainer, root / "resumed-regathered")
    out["resumed"] = losses(trainer.run())

    # A new run from the final weights, with a learning rate too small to move them visibly: the
    # fp32 master must hold the imported weights, or the first step would restore the random init.
    source = root / "full" / "checkpoints" / f"step_{STEPS:08d}"
    _, trainer = _build([*stage_args, "train.max_steps=1", "checkpoint.interval=0", "optim.lr=1e-9",
                         f"checkpoint.init_from={source}"], root / "init", base)
    out["init_regathered"] = _regather(trainer, root / "init-regathered")
    trainer.run()
    return out


def _all_stages(root: str, base: list[str] = BASE) -> dict[int, dict]:
    return {stage: _stage(stage, Path(root) / f"zero{stage}", base) for stage in (0, 1, 2, 3)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("bf16")
    return run_distributed(_all_stages, 2, str(root))[0] | {"root": root}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_resume_restores_master_weights_and_moments(runs, stage: int) -> None:
    out, root = runs[stage], runs["root"] / f"zero{stage}"
    assert len(out["full"]) == STEPS and out["full"][-1] < out["full"][0]
    saved = _tensors(root / "full" / "checkpoints" / f"step_{SAVE_AT:08d}")
    regathered = _tensors(Path(out["resumed_regathered"]))
    assert saved.keys() == regathered.keys()
    for name, value in saved.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, regathered[name]), f"ZeRO-{stage} ({out['optimizer']}): {name} changed on load"
    assert out["resumed"] == out["full"][SAVE_AT:], f"ZeRO-{stage}: resume is not bit-exact"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_init_from_sets_the_fp32_master_weights(runs, stage: int) -> None:
    out, root = runs[stage], runs["root"] / f"zero{stage}"
    source = _tensors(root / "full" / "checkpoints" / f"step_{STEPS:08d}")
    loaded = _tensors(Path(out["init_regathered"]))
    after_step = _tensors(root / "init" / "checkpoints" / "step_00000001")
    for name, value in source.items():
        if name.endswith(("exp_avg", "exp_avg_sq")):
            continue  # init_from takes the weights only
        assert torch.equal(loaded[name], value), f"ZeRO-{stage}: master of {name} is not the imported weight"
        # lr 1e-9 moves a weight by about 1e-9; a master left at the random init would differ by ~0.02.
        assert (after_step[name] - value).abs().max() < 1e-6, f"ZeRO-{stage}: {name} lost after the first step"


def test_bf16_wrappers_are_the_ones_named(runs) -> None:
    """The stages above cover the plain engine and each of DeepSpeed's bf16 optimizer wrappers."""
    assert runs[0]["optimizer"] == "AdamW"  # bf16 without ZeRO: autocast, torch's AdamW on fp32 weights
    assert runs[1]["optimizer"] == "BF16_Optimizer"  # ZeRO-1 with fp32 gradient accumulation
    assert runs[3]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
