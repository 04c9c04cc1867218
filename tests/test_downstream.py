"""Downstream evaluation with lm-eval: our adapter scores like lm-eval's own Hugging Face model
class on the to-hf export, in TP and DP layouts; the loop logs the scores; the tool scores a checkpoint as the loop did. That
the default job beats chance on the shipped python_next_line task is checked in test_default_run.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import HUNG, TINY, run_distributed

ITEMS = 12  # python_next_line items: 48 (context, choice) requests


def _requests():
    from lm_eval.api.instance import Instance

    from pretrain.evals.downstream import TASKS_DIR

    import importlib.util
    spec = importlib.util.spec_from_file_location("python_next_line", TASKS_DIR / "python_next_line.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    items = module.build(num_items=ITEMS)["test"]
    return [Instance(request_type="loglikelihood", doc=item, arguments=(item["context"], choice), idx=j)
            for item in items for j, choice in enumerate(item["choices"])]


def _ours(overrides: list[str], run_dir: str, train_steps: bool, limit: int):
    """Build (and optionally train) a run; return our adapter's loglikelihoods and task scores."""
    from pretrain.config import compose
    from pretrain.evals.downstream import evaluate_tasks, flatten
    from pretrain.evals.lm import PretrainLM
    from pretrain.data import load_tokenizer
    from pretrain.train import build
    import os

    trainer = build(compose([*overrides, f"run.dir={run_dir}"], world_size=int(os.environ["WORLD_SIZE"])))
    if train_steps:
        trainer.run()
    lm = PretrainLM(trainer.engine.module, load_tokenizer(trainer.data_dir), max_length=256,
                    device=trainer.dims.device, batch_size=8)
    scores = evaluate_tasks(lm, ["python_next_line"], limit=limit)
    return lm.loglikelihood(_requests(), disable_tqdm=True), scores and flatten(scores)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model trained 3 steps; its checkpoint, its to-hf export and our TP=1 results."""
    from pretrain.hf import to_hf

    root = tmp_path_factory.mktemp("downstream")
    overrides = TINY + ["train.max_steps=3", "model.max_seq_len=256"]
    ours = run_distributed(_ours, 1, overrides, str(root / "run"), True, 20)[0]
    hf_dir = to_hf(root / "run", root / "hf")
    return root, overrides, hf_dir, ours


@pytest.fixture(scope="module")
def hf_results(exported):
    """lm-eval's own HFLM on the export: loglikelihoods of the same requests and the task scores."""
    return _hf_results(exported[2])


def _hf_results(hf_dir: Path):
    from lm_eval.models.huggingface import HFLM

    from pretrain.evals.downstream import evaluate_tasks, flatten

    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=8)
    return lm.loglikelihood(_requests(), disable_tqdm=True), flatten(evaluate_tasks(lm, ["python_next_line"], limit=20))


@pytest.mark.parametrize("layout", ["tp1", "tp2", "dp2"])
def test_adapter_matches_lm_eval_hf_model_on_the_export(exported, hf_results, layout) -> None:
    root, overrides, hf_dir, ours = exported
    if layout != "tp1":  # the same weights loaded into another layout
        extra = ["parallel.tp=2"] if layout == "tp2" else ["parallel.zero_stage=3"]
        ours = run_distributed(_ours, 2, overrides + extra + [f"checkpoint.init_from={root}/run",
                                                              "checkpoint.resume=false"],
                               str(root / layout), False, 20)[0]
    (ll_ours, scores_ours), (ll_theirs, scores_theirs) = ours, hf_results
    assert len(ll_ours) == len(ll_theirs) == 4 * ITEMS
    worst = max(abs(a[0] - b[0]) for a, b in zip(ll_ours, ll_theirs))
    assert worst < 1e-4, f"loglikelihoods differ by up to {worst}"
    assert [a[1] for a in ll_ours] == [b[1] for b in ll_theirs]
    # The same task scores (over 20 documents; DP=2 splits them between the two ranks).
    assert scores_ours == pytest.approx(scores_theirs, abs=1e-9)
    assert set(scores_ours) == {"downstream/python_next_line/acc", "downstream/python_next_line/acc_norm"}


def test_evaluate_tool_scores_a_checkpoint_as_training_did(exported, tmp_path: Path) -> None:
    """`tools/evaluate.py CKPT --tasks ...` (downstream_eval.py's path) gives the scores the loop's adapter gave."""
    import subprocess
    import sys

    root, _, _, (_, scores) = exported
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "tools/evaluate.py", str(root / "run"), "--tasks", "python_next_line",
                           "--limit", "20", "--device", "cpu", "--out", str(out)], cwd=repo, capture_output=True,
                          text=True, timeout=HUNG)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = json.loads(out.read_text())
    assert written["step"] == 3
    assert {k: written[k] for k in scores} == pytest.approx(scores, abs=1e-9)


def _graphs_compiled_while_scoring(overrides: list[str], run_dir: str) -> tuple[bool, int]:
    import os

    from torch._dynamo.utils import counters

    from pretrain.config import compose
    from pretrain.data import load_tokenizer
    from pretrain.evals.lm import PretrainLM
    from pretrain.train import build

    trainer = build(compose([*overrides, f"run.dir={run_dir}"], world_size=int(os.environ["WORLD_SIZE"])))
    model = trainer.engine.module
    compiled = model.layers[0]._compiled_call_impl is not None  # set by nn.Module.compile()
    lm = PretrainLM(model, load_tokenizer(trainer.data_dir), max_length=256, device=trainer.dims.device, batch_size=8)
    before = counters["stats"]["unique_graphs"]
    lm.loglikelihood(_requests(), disable_tqdm=True)
    return compiled, counters["stats"]["unique_graphs"] - before


def test_scoring_runs_compiled_blocks_eagerly(tmp_path) -> None:
    """The requests' batches each have their own width: scoring them through compiled blocks would
    compile again and again (twice as slow as eager in a 4-step run with one downstream eval)."""
    compiled, graphs = run_distributed(_graphs_compiled_while_scoring, 1, TINY + ["model.compile=true"],
                                       str(tmp_path / "run"))[0]
    assert compiled and graphs == 0
