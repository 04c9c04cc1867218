"""tools/benchmark.py runs pretrain and its references on one shape and reports them as JSON.

Only the report's shape and sanity are checked, never speed (timing assertions fail on a loaded
machine); the numbers themselves are for people, with the commands in the README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import HUNG

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("precision, mode, accum", [("fp32", "fp32", 2), ("bf16", "bf16 autocast, fp32 weights", 1)])
def test_benchmark_json_reports_pretrain_and_every_reference(precision: str, mode: str, accum: int) -> None:
    """bf16: every contender trains under autocast on CPU too (megatron's linear once failed there).
    accum: a step is one optimizer step over that many micro-batches, and its tokens count them all."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # PRETRAIN_CACHE (conftest) points it at the session corpus
    cmd = [sys.executable, "tools/benchmark.py", "--hidden", "64", "--layers", "1", "--heads", "4", "--kv-heads", "2",
           "--vocab", "1024", "--seq-len", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
           "--precision", precision, "--zero-stage", "1", "--grad-accum", str(accum), "--json", "--profile", "1"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HUNG)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)  # stdout holds the JSON alone; logs go to stderr
    assert report["model"]["num_kv_heads"] == 2 and report["seq_len"] == 32 and report["zero_stage"] == 1
    assert report["engine_zero_stage"] == 0 and report["precision_mode"] == mode  # one rank: nothing to shard
    assert set(report["results"]) == {"pretrain", "transformers", "eager"} | (
        {"megatron"} if torch.cuda.is_available() else set())
    assert report["grad_accum"] == report["engine_grad_accum"] == accum  # pretrain's engine took it
    import transformers

    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["transformers"] == transformers.__version__
    for name, r in report["results"].items():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["step_s"] > 0, name
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(2 * 32 * accum), name  # batch x seq x accum
    assert set(report["ratios"]) == set(report["ratio_quartiles"]) == set(report["results"]) - {"pretrain"}
    for name, (q1, q3) in report["ratio_quartiles"].items():  # the median per-step ratio lies between
        assert 0 < q1 <= report["ratios"][name] <= q3, name
    if not torch.cuda.is_available():
        assert "megatron" in report["skipped"] and report["timing"] == "interleaved"
    # --profile: one more pretrain step under the profiler, its busiest operators by self time.
    prof = report["profile"]
    assert prof["steps"] == 1 and prof["step_s"] > 0 and 0 < prof["busy_s"] and 0 < len(prof["top"]) <= 15
    shares = [k["share"] for k in prof["top"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= prof["busy_share"] + 1e-9
    if not torch.cuda.is_available():  # CPU operators by name (a GPU lists its kernels, named by the library)
        assert any(k["name"] in ("aten::mm", "aten::addmm", "aten::bmm") for k in prof["top"])
    # Every timed kernel in one kind: the kinds add up to the busy time; matrix products and AdamW are there.
    kinds = prof["by_kind"]
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(prof["busy_share"], rel=1e-6)
    assert {"matmul", "optimizer, norms (multi-tensor)"} <= set(kinds) and kinds["matmul"]["share"] > 0
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import profile_lines

    assert profile_lines(prof)[0].startswith("profile of pretrain, 1 step(s): ")
    assert profile_lines(prof)[1].startswith("  by kind: ") and "matmul" in profile_lines(prof)[1]


def test_ratio_quartiles_stay_within_the_measured_step_ratios() -> None:
    """Three interleaved steps, one of them slow for pretrain alone: the per-step ratios are 1.0,
    1.1 and 0.2. Their quartiles must lie among them (0.6 to 1.05), where the default 'exclusive'
    method would extrapolate past the slowest step and can give a ratio below zero."""
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import step_ratios

    ratios, spreads = step_ratios({"pretrain": [1.0, 1.0, 5.0], "transformers": [1.0, 1.1, 1.0]}, interleaved=True)
    assert ratios["transformers"] == pytest.approx(1.0)
    assert spreads["transformers"] == pytest.approx([0.6, 1.05])
    ratios, spreads = step_ratios({"pretrain": [1.0, 1.0, 5.0, 1.0], "eager": [0.2, 1.0, 1.0, 1.0]}, interleaved=True)
    assert 0.2 <= spreads["eager"][0] <= ratios["eager"] <= spreads["eager"][1] <= 1.0


def test_the_megatron_reference_is_the_same_model_and_recomputes_its_attention_scores() -> None:
    """megatron-core's reference: the parameters of pretrain's model of the same shape, and
    selective recompute of its unfused attention, which otherwise keeps every layer's [batch,
    heads, seq, seq] scores for the backward (the 1b preset ran an H100 out of memory without it).
    Its forward needs CUDA, but it builds on the CPU: a setting this megatron-core refuses fails here."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from launch.plan import parameter_count
    from pretrain.config import compose

    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import megatron_gpt

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        cfg = compose(["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
                       "model.vocab_size=1024"])
        model = megatron_gpt(cfg, 32, torch.device("cpu"))
    finally:
        parallel_state.destroy_model_parallel()
        if started:
            dist.destroy_process_group()
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg.model)
    layers = model.decoder.layers
    assert len(layers) == 2 and all(layer.self_attention.checkpoint_core_attention for layer in layers)
