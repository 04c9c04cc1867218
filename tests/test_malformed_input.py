"""Malformed input of every kind gives one clear error, never hangs, and changes no file.

Each row damages a copy of a good input (dataset shards and manifests, checkpoints, configs,
Hugging Face directories, tokenizer files) and runs the entry point a user would: the config
composer, the resume choice, the data loader, tools/convert_checkpoint.py. Every file in the
case's directory is hashed before and after: nothing may change, appear or vanish.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import pytest
import torch

from pretrain.checkpoint.format import CheckpointError
from pretrain.config import ConfigError, ModelConfig, compose
from pretrain.data.manifest import DatasetError
from pretrain.data.state import StateError
from pretrain.hf import ConversionError

REPO = Path(__file__).resolve().parent.parent
EXPECTED = (CheckpointError, ConversionError, DatasetError, ConfigError, StateError)
MODEL = asdict(ModelConfig(name="t", vocab_size=1024, hidden_size=32, num_layers=1, num_heads=4, max_seq_len=64))
CKPT_MODEL, CKPT_OPTIM = "model-00000-of-00001.safetensors", "optim-00000-of-00001.safetensors"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A good dataset, a good training checkpoint (weights + moments) in a run directory, and a good
    Hugging Face directory, to copy and damage."""
    from pretrain.checkpoint.format import file_record, write_json_atomic, write_tensors
    from pretrain.data import prepare_embedded_corpus
    from pretrain.hf import expected_names, expected_shape, to_hf

    root = tmp_path_factory.mktemp("good")
    shutil.copytree(prepare_embedded_corpus(os.environ["PRETRAIN_CACHE"], vocab_size=1024), root / "data")
    ckpt = root / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    names = expected_names(dict(MODEL, num_kv_heads=4, ffn_hidden_size=ModelConfig(**MODEL).ffn_size))
    model = {n: torch.randn(expected_shape(n, dict(MODEL, num_kv_heads=4, ffn_hidden_size=ModelConfig(**MODEL).ffn_size)))
             for n in names}
    moments = {f"{n}.{k}": torch.zeros_like(v) for n, v in model.items() for k in ("exp_avg", "exp_avg_sq")}
    files = {CKPT_MODEL: write_tensors(ckpt / CKPT_MODEL, model), CKPT_OPTIM: write_tensors(ckpt / CKPT_OPTIM, moments)}
    shutil.copy(root / "data" / "tokenizer.json", ckpt / "tokenizer.json")
    files["tokenizer.json"] = file_record(ckpt / "tokenizer.json")
    tensors = {n: {"file": CKPT_MODEL, "optim_file": CKPT_OPTIM, "shape": list(v.shape), "tp_partition_dim": None}
               for n, v in model.items()}
    write_json_atomic(ckpt / "manifest.json", {
        "format_version": 1, "step": 1, "optimizer_step": 1, "consumed_tokens": 0, "model": MODEL, "config": {},
        "layout": {"tp": 1, "dp": 1, "zero_stage": 0}, "data": None, "tensors": tensors, "files": files,
        "tokenizer": {"dataset_dir": None, "file": "tokenizer.json"}})
    (ckpt.parent / "latest").write_text("step_00000001\n")
    to_hf(ckpt, root / "hf", with_tokenizer=False)
    return root


# --- the entry points ------------------------------------------------------------------------------

def inspect(case: Path, capsys) -> str:
    """`tools/convert_checkpoint.py inspect --verify` on the case's run directory."""
    assert _tool("convert_checkpoint").main(["inspect", "--verify", str(case / "run")]) == 2
    return capsys.readouterr().err


def resume_choice(case: Path, capsys) -> str:
    """What a restarted run does first: choose the newest verified checkpoint."""
    from pretrain.checkpoint.format import newest_verified

    newest_verified(case / "run" / "checkpoints")
    raise AssertionError("no error")


def from_hf(case: Path, capsys) -> str:
    assert _tool("convert_checkpoint").main(["from-hf", str(case / "hf"), str(case / "imported")]) == 2
    return capsys.readouterr().err


def to_hf(case: Path, capsys) -> str:
    assert _tool("convert_checkpoint").main(["to-hf", str(case / "run"), str(case / "exported")]) == 2
    return capsys.readouterr().err


def loader(case: Path, capsys) -> str:
    """The training data loader: open the dataset and read a batch (checksums verified)."""
    from pretrain.data import TokenLoader

    next(iter(TokenLoader(case / "data", "train", 32, 2, 0, 1, seed=0, verify_checksums=True)))
    raise AssertionError("no error")


def tokenizer(case: Path, capsys) -> str:
    from pretrain.data import load_tokenizer

    load_tokenizer(case / "data")
    raise AssertionError("no error")


def config(*overrides: str, world_size: int | None = None) -> Callable:
    def run(case: Path, capsys) -> str:
        compose(list(overrides), world_size=world_size)
        raise AssertionError("no error")
    return run


# --- the damage ------------------------------------------------------------------------------------

def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    body = json.loads(path.read_text())
    result = change(body)
    path.write_text(json.dumps(body if result is None else result))


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def first_shard(case: Path) -> Path:
    from pretrain.data import TokenLoader

    return case / "data" / TokenLoader(case / "data", "train", 32, 2, 0, 1, seed=0).assigned_shards(0)[0]


CK = "run/checkpoints/step_00000001"
DM = "data/manifest.json"


def manifest(case: Path, change: Callable[[dict], object]) -> None:
    edit_json(case / CK / "manifest.json", change)


# (id, damage(case), entry point, what the message must contain)
CASES: list[tuple[str, Callable[[Path], None], Callable, str]] = [
    # configs
    ("config-log-interval-0", lambda c: None, config("train.log_interval=0"), "train.log_interval"),
    ("config-eval-batches-0", lambda c: None, config("train.eval_batches=0"), "train.eval_batches"),
    ("config-global-batch-0", lambda c: None, config("train.global_batch_tokens=0"), "train.global_batch_tokens"),
    ("config-global-batch-not-multiple", lambda c: None, config("train.global_batch_tokens=1000", world_size=2),
     "train.global_batch_tokens"),
    ("config-lr-nan", lambda c: None, config("optim.lr=nan"), "optim.lr"),
    ("config-beta2-1", lambda c: None, config("optim.beta2=1.0"), "optim.beta2"),
    ("config-negative-hang-timeout", lambda c: None, config("train.hang_timeout=-1"), "train.hang_timeout"),
    ("config-port-out-of-range", lambda c: None, config("launcher.rdzv_port=70000"), "launcher.rdzv_port"),
    ("config-guard-window-1", lambda c: None, config("train.guard.window=1"), "train.guard.window"),
    ("config-text-for-int", lambda c: None, config("train.max_steps=ten"), "train.max_steps"),
    ("config-collective-timeout-0", lambda c: None, config("train.collective_timeout=0"), "train.collective_timeout"),
    # checkpoints
    ("ckpt-latest-outside", lambda c: (c / "run/checkpoints/latest").write_text("../../../etc\n"), inspect,
     "not a step_* directory"),
    ("ckpt-latest-missing-step", lambda c: (c / "run/checkpoints/latest").write_text("step_00000009\n"), inspect,
     "has no manifest.json"),
    ("ckpt-manifest-not-json", lambda c: (c / CK / "manifest.json").write_text("{\"step\": 1,"), inspect, "corrupt"),
    ("ckpt-manifest-a-list", lambda c: (c / CK / "manifest.json").write_text("[1, 2]"), inspect, "not a JSON object"),
    ("ckpt-manifest-file-outside", lambda c: manifest(c, lambda m: m["tensors"]["norm.weight"].update(
        file="../../../../etc/passwd")), inspect, "outside the checkpoint directory"),
    ("ckpt-manifest-absolute-file", lambda c: manifest(c, lambda m: m["files"].update(
        {"/etc/passwd": {"bytes": 1, "sha256": "0"}})), inspect, "outside the checkpoint directory"),
    ("ckpt-manifest-step-text", lambda c: manifest(c, lambda m: m.update(step="one")), inspect, "wrong type"),
    ("ckpt-newer-format", lambda c: manifest(c, lambda m: m.update(format_version=99)), inspect, "newer than"),
    ("ckpt-truncated-weights", lambda c: os.truncate(c / CK / CKPT_MODEL, 100), inspect, "checksum mismatch"),
    ("ckpt-flipped-moments", lambda c: flip(c / CK / CKPT_OPTIM), inspect, "checksum mismatch"),
    ("ckpt-missing-file", lambda c: (c / CK / CKPT_OPTIM).unlink(), inspect, "missing"),
    ("ckpt-none-verifies", lambda c: flip(c / CK / CKPT_MODEL), resume_choice, "no checkpoint in"),
    ("ckpt-export-corrupt", lambda c: flip(c / CK / CKPT_MODEL), to_hf, "checksum mismatch"),
    # Hugging Face directories
    ("hf-no-config", lambda c: (c / "hf/config.json").unlink(), from_hf, "config.json: missing"),
    ("hf-config-not-json", lambda c: (c / "hf/config.json").write_text("{"), from_hf, "not valid JSON"),
    ("hf-config-no-hidden-size", lambda c: edit_json(c / "hf/config.json", lambda b: b.pop("hidden_size") and None),
     from_hf, "'hidden_size'"),
    ("hf-config-gpt2", lambda c: edit_json(c / "hf/config.json", lambda b: b.update(model_type="gpt2")),
     from_hf, "model_type='gpt2', architectures=['LlamaForCausalLM']; only LlamaForCausalLM"),
    ("hf-weights-garbage", lambda c: (c / "hf/model.safetensors").write_bytes(b"\x10\x00" * 20), from_hf,
     "not a valid safetensors file"),
    ("hf-index-outside", lambda c: (c / "hf/model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "../../secret.safetensors"}})), from_hf, "outside"),
    ("hf-index-not-json", lambda c: (c / "hf/model.safetensors.index.json").write_text("nope"), from_hf,
     "not a valid safetensors index"),
    ("hf-only-pickle", lambda c: ((c / "hf/model.safetensors").rename(c / "hf/pytorch_model.bin")), from_hf,
     "only pickle"),
    # dataset manifests and shards
    ("data-no-manifest", lambda c: (c / DM).unlink(), loader, "manifest not found"),
    ("data-manifest-garbage", lambda c: (c / DM).write_text("\x00\x01"), loader, "not valid JSON"),
    ("data-manifest-version", lambda c: edit_json(c / DM, lambda b: b.update(version=7)), loader,
     "unknown manifest version"),
    ("data-shard-outside", lambda c: edit_json(c / DM, lambda b: b["splits"]["train"][0].update(
        file="../../../etc/hosts")), loader, "outside"),
    ("data-shard-missing", lambda c: (c / "data/train-00003.tar").unlink(), loader, "shard file is missing"),
    ("data-shard-truncated", lambda c: os.truncate(first_shard(c), 1000), loader, "checksum mismatch"),
    ("data-shard-bytes-flipped", lambda c: flip(first_shard(c)), loader, "checksum mismatch"),
    ("data-shard-negative-tokens", lambda c: edit_json(c / DM, lambda b: b["splits"]["train"][0].update(tokens=-5)),
     loader, "malformed"),
    # tokenizer files
    ("tokenizer-garbage", lambda c: (c / "data/tokenizer.json").write_text("{\"model\": 3}"), tokenizer,
     "not a valid tokenizers JSON file"),
    ("tokenizer-missing", lambda c: (c / "data/tokenizer.json").unlink(), tokenizer, "tokenizer file not found"),
    ("tokenizer-outside", lambda c: edit_json(c / DM, lambda b: b["tokenizer"].update(file="/etc/passwd")),
     tokenizer, "outside"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _timeout(signum, frame):
    raise TimeoutError("the case hung (no answer in 60 s)")


@pytest.mark.parametrize("name, damage, entry, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_gives_one_clear_error_and_changes_nothing(name, damage, entry, expected, good: Path,
                                                                   tmp_path: Path, capsys) -> None:
    case = tmp_path / "case"
    needs = {"config": (), "ckpt": ("run",), "hf": ("hf",), "data": ("data",), "tokenizer": ("data",)}
    for part in needs[name.split("-")[0]]:
        shutil.copytree(good / part, case / part)
    case.mkdir(exist_ok=True)
    damage(case)
    before = _snapshot(case)
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)
    try:
        try:
            message = entry(case, capsys)
        except EXPECTED as err:
            message = str(err)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    message = message.strip()
    print(f"{name}: {message}")
    with open(os.environ.get("MALFORMED_TABLE", os.devnull), "a") as table:
        table.write(f"| {name} | {message} |\n")
    assert message and "\n" not in message, message
    assert expected in message, message
    assert _snapshot(case) == before  # nothing modified, created or removed
