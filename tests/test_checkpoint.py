"""Checkpoint safety: atomic saves survive kill -9, damaged checkpoints fail clearly and change
nothing, keep_last prunes, and the manifest records what export and resume need."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import HUNG, TINY, run_distributed, train

ROOT = Path(__file__).resolve().parent.parent


def _train(overrides: list[str], run_dir: str) -> list[int]:
    records, _ = train(overrides, run_dir)
    return [r["step"] for r in records]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run on the embedded corpus: 4 steps, a checkpoint every step, keep_last=2."""
    run_dir = tmp_path_factory.mktemp("run")
    run_distributed(_train, 1, TINY + ["train.max_steps=4", "checkpoint.interval=1", "checkpoint.keep_last=2",
                                       "parallel.zero_stage=0"], str(run_dir))
    return run_dir


def _tokens_by_step(overrides: list[str], run_dir: str) -> dict[int, int]:
    records, _ = train(overrides, run_dir)
    return {r["step"]: r["consumed_tokens"] for r in records if "consumed_tokens" in r}


def test_consumed_tokens_count_on_from_the_checkpoint_in_another_layout(run: Path, tmp_path: Path) -> None:
    """Resumed on 2 DP ranks, a step takes twice the tokens of the saving run's: the count goes on from
    the checkpoint's 4 x 64 tokens, not from (step x this run's tokens per step)."""
    import shutil

    from pretrain.checkpoint import read_manifest, resolve

    shutil.copytree(run, tmp_path / "run")
    tokens = run_distributed(_tokens_by_step, 2, TINY + ["train.max_steps=6", "checkpoint.interval=6",
                                                        "parallel.zero_stage=0"], str(tmp_path / "run"))[0]
    assert tokens == {5: 4 * 64 + 128, 6: 4 * 64 + 2 * 128}
    assert read_manifest(resolve(tmp_path / "run"))["consumed_tokens"] == 4 * 64 + 2 * 128


def test_keep_last_prunes_old_checkpoints(run: Path) -> None:
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"


def test_prune_never_removes_the_checkpoint_latest_names(tmp_path: Path) -> None:
    from pretrain.checkpoint.format import prune

    for step in (1, 2, 3, 5):
        (tmp_path / f"step_{step:08d}").mkdir()
        (tmp_path / f"step_{step:08d}" / "manifest.json").write_text("{}")
    (tmp_path / "step_00000009").mkdir()  # no manifest: not a complete checkpoint, never counted
    (tmp_path / "latest").write_text("step_00000002\n")  # e.g. a run rolled back by hand
    prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000005", "step_00000009"]


def test_manifest_records_position_tokens_layout_and_tokenizer(run: Path) -> None:
    from pretrain.checkpoint import read_manifest, resolve

    ckpt = resolve(run)
    manifest = read_manifest(ckpt)
    assert manifest["step"] == manifest["optimizer_step"] == 4
    assert manifest["consumed_tokens"] == 4 * 2 * 32  # steps x micro-batch x seq_len, one DP rank
    assert manifest["layout"] == {"tp": 1, "dp": 1, "zero_stage": 0, "precision": "fp32", "world_size": 1}
    assert manifest["data"] and manifest["model"]["hidden_size"] == 64
    assert manifest["tokenizer"]["file"] == "tokenizer.json" and (ckpt / "tokenizer.json").is_file()
    assert Path(manifest["tokenizer"]["dataset_dir"]).is_dir()
    assert "tokenizer.json" in manifest["files"]


def test_writers_are_balanced_by_bytes() -> None:
    from pretrain.checkpoint.io import assign_writers

    sizes = [1000, 10, 10, 400, 400, 200, 10, 1000]
    owners = assign_writers(sizes, 2)
    assert owners == assign_writers(sizes, 2)  # deterministic
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(sizes[1:])  # not parameter i -> rank i % world
    assert assign_writers(sizes, 1) == [0] * len(sizes)


# --- damaged checkpoints ------------------------------------------------------------------------

def _snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _damage(ckpt: Path, kind: str) -> str:
    """Damage a copy of a checkpoint; returns the file name the error must mention."""
    manifest_path = ckpt / "manifest.json"
    if kind == "newer-format":
        manifest = json.loads(manifest_path.read_text())
        manifest["format_version"] = 99
        manifest_path.write_text(json.dumps(manifest))
        return "manifest.json"
    if kind == "corrupt-manifest":
        manifest_path.write_text(manifest_path.read_text()[:100])
        return "manifest.json"
    if kind == "missing-file":
        (ckpt / "optim-00000-of-00001.safetensors").unlink()
        return "optim-00000-of-00001.safetensors"
    if kind == "corrupt-file":  # flip bytes inside the tensor data, size unchanged
        path = ckpt / "model-00000-of-00001.safetensors"
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        return "model-00000-of-00001.safetensors"
    assert kind == "other-shape"
    return "manifest.json"


DAMAGE = {"other-shape": "different model", "newer-format": "newer than", "corrupt-manifest": "corrupt",
          "missing-file": "missing", "corrupt-file": "checksum mismatch"}


def _load_damaged(base: list[str], cases: list[tuple[str, str, str]], scratch: str) -> list[str]:
    """Build one model per shape, then load each damaged checkpoint into it: every load must
    raise CheckpointError and leave the parameters and the checkpoint files as they were."""
    from megatron.core import parallel_state

    from pretrain import checkpoint
    from pretrain.config import compose, to_dict
    from pretrain.train import build

    messages = []
    for kind, path, layers in cases:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        cfg = compose([*base, f"model.num_layers={layers}", f"run.dir={scratch}-{kind}"], world_size=1)
        engine = build(cfg).engine
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        files = _snapshot(Path(path))
        with pytest.raises(checkpoint.CheckpointError) as err:
            checkpoint.load(engine, Path(path), to_dict(cfg)["model"])
        assert all(torch.equal(p, before[n]) for n, p in engine.module.named_parameters()), kind
        assert _snapshot(Path(path)) == files, kind
        messages.append(str(err.value))
    return messages


def test_damaged_checkpoints_fail_clearly_and_change_nothing(run: Path, tmp_path: Path) -> None:
    import shutil

    from pretrain.checkpoint import resolve

    source = resolve(run)
    cases, expected = [], []
    for kind in DAMAGE:
        copy = tmp_path / kind / source.name
        shutil.copytree(source, copy)
        expected.append(_damage(copy, kind))
        cases.append((kind, str(copy), 3 if kind == "other-shape" else 2))
    base = TINY + ["parallel.zero_stage=0", "checkpoint.resume=false"]
    messages = run_distributed(_load_damaged, 1, base, cases, str(tmp_path / "scratch"))[0]
    for (kind, path, _), filename, message in zip(cases, expected, messages):
        assert str(Path(path) / filename) in message, (kind, message)
        assert DAMAGE[kind] in message and "\n" not in message, (kind, message)
    assert "model.num_layers=2 (this run: 3)" in messages[0]


def test_train_main_reports_corrupt_checkpoints_in_one_line_and_exits_2(run: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints")
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    _damage(ckpt, "corrupt-file")
    _damage(tmp_path / "checkpoints" / "step_00000003", "corrupt-file")  # no older one to fall back to
    result = subprocess.run([sys.executable, "-m", "pretrain.train", *TINY, "parallel.zero_stage=0",
                             "train.max_steps=6", f"run.dir={tmp_path}"], capture_output=True, text=True,
                            timeout=HUNG, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if "checksum mismatch" in l]
    assert len(lines) == 1 and str(ckpt / "model-00000-of-00001.safetensors") in lines[0]
    assert not (ckpt.parent / "step_00000005").exists()


# --- kill -9 during a save ----------------------------------------------------------------------

# A model large enough (~26M parameters, ~320 MB per checkpoint) that a save takes a while.
BIG = [o for o in TINY if not o.startswith(("model.hidden_size", "model.num_layers", "model.num_heads",
                                            "model.num_kv_heads"))] + [
    "model.hidden_size=512", "model.num_layers=8", "model.num_heads=8", "parallel.zero_stage=0",
    "checkpoint.interval=1", "checkpoint.keep_last=0"]


def test_kill_during_save_leaves_latest_loadable(tmp_path: Path) -> None:
    from pretrain.checkpoint import read_manifest, resolve
    from pretrain.checkpoint.format import verify_files

    ckpts = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", *BIG, "train.max_steps=3", f"run.dir={tmp_path}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = ckpts / ".tmp-step_00000002"
    try:
        deadline = time.monotonic() + HUNG
        # The save of step 2 has begun (so step 1 is complete and `latest`) and is writing files.
        while not (partial.is_dir() and any(partial.glob("*.safetensors"))):
            assert proc.poll() is None, "training ended before the save of step 2 could be interrupted"
            assert time.monotonic() < deadline, "the save of step 2 never started"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert partial.is_dir() and not (ckpts / "step_00000002").exists(), "killed too late to test anything"
    assert (ckpts / "latest").read_text().strip() == "step_00000001"
    latest = resolve(tmp_path)
    verify_files(latest, read_manifest(latest))  # complete: every file present with its checksum

    # Starting the run again resumes from step 1, and its next save removes the partial directory.
    steps = run_distributed(_train, 1, [*BIG, "train.max_steps=2"], str(tmp_path))[0]
    assert steps == [2]  # resumed at step 1
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert read_manifest(resolve(tmp_path))["step"] == 2
