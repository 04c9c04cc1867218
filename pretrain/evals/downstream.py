"""Downstream evaluation with lm-eval: the tasks named in config, from local task YAML only.

Tasks are found by lm-eval's TaskManager in this package's tasks/ directory and in
eval.include_path (any directory of the harness's standard task YAML), never in the harness's
built-in registry, whose tasks download their datasets.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def task_manager(include_path: Optional[str] = None):
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths, include_defaults=False)


def flatten(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"results": {task: {"acc,none": x, ...}}} -> {"downstream/task/acc": x, ...}."""
    out: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # metrics are "name,filter"; other keys are bookkeeping
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric:
                out[f"downstream/{task}/{metric}" + ("" if filt in ("", "none") else f"_{filt}")] = float(value)
    return out


def evaluate_tasks(lm, tasks: list[str], include_path: Optional[str] = None, limit: Optional[int] = None,
                   num_fewshot: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Run lm-eval on `lm` (collective over all ranks); the full results on DP rank 0, else None."""
    from lm_eval import evaluator

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return evaluator.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(include_path),
                                     limit=limit, num_fewshot=num_fewshot, log_samples=False,
                                     bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                     torch_random_seed=0, fewshot_random_seed=0)


class DownstreamEval:
    """Called by the training loop after each step; runs the configured tasks every `interval` steps
    (and at the last step) and returns flattened scores on the rank that logs, else None."""

    def __init__(self, cfg, model: torch.nn.Module, data_dir: Path, device: torch.device) -> None:
        self.cfg = cfg.eval
        self.interval = cfg.eval.downstream_interval
        self._lm = None
        if self.interval:
            from pretrain.data import load_tokenizer
            from pretrain.evals.lm import PretrainLM

            self._lm = PretrainLM(model, load_tokenizer(data_dir), max_length=cfg.model.max_seq_len, device=device,
                                  batch_size=cfg.eval.batch_size)

    def due(self, step: int, last: bool) -> bool:
        """Whether maybe_run(step, last) would evaluate (the loop reads its metrics first)."""
        return self._lm is not None and (step % self.interval == 0 or last)

    def maybe_run(self, step: int, last: bool) -> Optional[dict[str, float]]:
        if not self.due(step, last):
            return None
        results = evaluate_tasks(self._lm, self.cfg.tasks, self.cfg.include_path, self.cfg.limit)
        return flatten(results) if results is not None else None
