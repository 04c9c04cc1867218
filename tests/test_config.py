"""A bad configuration fails before any worker starts, with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, compose, from_yaml, to_yaml
from helpers import HUNG

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("override, key", [
    ("train.foo=1", "train.foo"),
    ("+train.max_stepz=10", "train.max_stepz"),  # `+` adds a key that the schema would drop silently
    ("+bogus=1", "bogus"),
    ("parallel.zero_stage=5", "parallel.zero_stage"),
    ("train.seq_len=0", "train.seq_len"),
    ("train.seq_len=-3", "train.seq_len"),
    ("model.num_heads=3", "model.num_heads"),
    ("model.num_kv_heads=3", "model.num_kv_heads"),
    ("model.attention=fast", "model.attention"),
    ("parallel.tp=abc", "parallel.tp"),
    ("optim.schedule=step", "optim.schedule"),
    ("train.precision=fp8", "train.precision"),
])
def test_bad_value_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose([override])
    message = str(err.value)
    assert "\n" not in message
    assert key in message


def test_unknown_preset_names_the_group_and_its_presets() -> None:
    with pytest.raises(ConfigError, match=r"model/huge'; choose one of 125m, 1b, .*tiny \(presets live in"):
        compose(["model=huge"])
    with pytest.raises(ConfigError, match=r"experiment/gpt125m'; choose one of gpt125m_8gpu"):
        compose(["experiment=gpt125m"])  # a misspelt experiment is not skipped as if none were given


def test_world_size_must_be_a_multiple_of_tp() -> None:
    with pytest.raises(ConfigError, match="parallel.tp"):
        compose(["parallel.tp=2"], world_size=3)


def test_presets_compose_and_round_trip_through_yaml() -> None:
    for model in ("tiny", "125m", "350m", "1b", "7b"):
        cfg = compose([f"model={model}"])
        assert cfg.model.name == model
        assert from_yaml(to_yaml(cfg)) == cfg


def test_overrides_reach_the_config() -> None:
    cfg = compose(["train.max_steps=20", "parallel.zero_stage=3", "run.dir=/tmp/r1", "experiment=gpt125m_8gpu"])
    assert (cfg.train.max_steps, cfg.parallel.zero_stage, cfg.run.dir) == (20, 3, "/tmp/r1")
    assert cfg.model.name == "125m" and cfg.train.global_batch_tokens == 524288


@pytest.mark.parametrize("override, key", [("parallel.zero_stage=5", "parallel.zero_stage"),
                                           ("train.bogus=1", "train.bogus"),
                                           ("data.path=DIR/nowhere", "nowhere/manifest.json: manifest not found"),
                                           ("data.path=DIR/data model.vocab_size=260", "model.vocab_size: 260")])
def test_launch_rejects_bad_config_before_starting_workers(tmp_path: Path, override: str, key: str) -> None:
    """Values the launcher can check itself, local datasets included, stop it before any worker starts."""
    run_dir = tmp_path / "run"
    if "data.path" in override:
        from pretrain.data import prepare_dataset, train_tokenizer

        text = tmp_path / "text"
        text.mkdir()
        texts = [f"document {i}: " + "lorem ipsum dolor sit amet " * 40 for i in range(8)]
        for i, t in enumerate(texts):
            (text / f"doc{i}.txt").write_text(t)
        train_tokenizer(texts, 300).save(str(tmp_path / "tokenizer.json"))
        prepare_dataset([text], tmp_path / "tokenizer.json", tmp_path / "data", val_fraction=0.3, tokens_per_shard=200)
        override = "data=prepared " + override.replace("DIR", str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "launch", *override.split(), f"run.dir={run_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=HUNG)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert not run_dir.exists()  # nothing started, nothing written


@pytest.mark.parametrize("tp", [1, 2])
def test_the_startup_block_says_sequence_parallelism_is_off_on_one_tp_rank(tp: int, tmp_path: Path) -> None:
    from pretrain.console import describe_run

    cfg = compose(["model=tiny", "parallel.sequence_parallel=true", f"parallel.tp={tp}"], world_size=2)
    info = describe_run(cfg, world_size=2, tp=tp, dp=2 // tp, device="cpu", zero_stage=0, parameters=1,
                        tokens_per_step=1, grad_accum=1, precision="fp32", attention="sdpa", compiled=False,
                        data_dir=tmp_path, start="step 0")
    if tp == 1:
        assert info.layout.endswith("(parallel.sequence_parallel=true: nothing to split over one TP rank, so it is off)")
    else:
        assert info.layout.endswith("| sequence parallel")
