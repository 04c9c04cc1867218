"""The memory planner (`python -m launch --dry-run`'s per-rank estimate, launch/plan.py) against the
bytes the tensors of a real run hold on CPU, component by component: weights, gradients (with
ZeRO-3's reduce bucket) and optimizer state, within 15%, measured right before the optimizer step,
when gradients and optimizer state are all allocated; and activations, the loss's logits and
autocast's bf16 weight copies (the plan's "casts") against the bytes autograd saves for the backward
during a micro-batch's forward, in TP layouts with and without sequence parallelism and selective
recompute (compiled blocks, the default). bf16 is checked at ZeRO-0 only (autocast over fp32 weights):
the bf16 ZeRO 1-3 gradient terms are fitted to CUDA's peak, which holds transient copies that a
snapshot of live tensors does not see; tests/test_gpu.py compares those totals with CUDA's peak."""

from __future__ import annotations

import gc

import pytest
import torch

from helpers import TINY, run_distributed, storage_bytes

# Big enough that the components dwarf the loop's small tensors (guard, batch, RoPE tables).
SHAPE = ["model.hidden_size=128", "model.num_heads=4", "model.num_kv_heads=2", "parallel.reduce_bucket_size=200000"]
LAYOUTS = {"zero0": ["parallel.zero_stage=0"], "zero1": ["parallel.zero_stage=1"],
           "zero2": ["parallel.zero_stage=2"], "zero3": ["parallel.zero_stage=3"],
           "tp2-zero1": ["parallel.zero_stage=1", "parallel.tp=2"],
           "zero0-bf16": ["parallel.zero_stage=0", "train.precision=bf16"]}


def _reachable_tensors(root: object) -> list[torch.Tensor]:
    """Every tensor the engine holds, through attributes, containers and tensors' own attributes and
    gradients (DeepSpeed hangs partitions and buffers off both); not through classes, modules or
    functions, which would lead to everything else in the process (and to other engines)."""
    import types

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen, stack, found = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            found.append(obj)
            if obj.grad is not None:
                stack.append(obj.grad)
        stack.extend(gc.get_referents(obj))
    return found


class MeasureAtTheOptimizerStep:
    """Sums the bytes held by each kind of tensor right before the torch optimizer's step of the
    given step (a step pre-hook): gradients are reduced and converted, optimizer state exists,
    activations are freed; for these components the moment of their peak."""

    def __init__(self, engine, step: int) -> None:
        from pretrain.parallel.engine import base_optimizer

        self.engine, self.step, self.bytes = engine, step, {}
        base_optimizer(engine).register_step_pre_hook(self._measure)

    def _measure(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        # ZeRO steps the torch optimizer once per parameter group: measure at the first of the step
        if self.engine.global_steps != self.step - 1 or self.bytes:
            return
        model = self.engine.module
        params = list(model.parameters())
        weights = storage_bytes([getattr(p, "ds_tensor", p) for p in params])  # ZeRO-3: the rank's partition
        # The fp32 master partitions: ZeRO lends the torch optimizer one group's at a time.
        zero = self.engine.optimizer
        held = [p for g in optimizer.param_groups for p in g["params"]]
        held += getattr(zero, "single_partition_of_fp32_groups", []) + getattr(zero, "fp32_partitioned_groups_flat", [])
        held += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.ndim]
        optim = {k: v for k, v in storage_bytes(held).items() if k not in weights}
        everything = storage_bytes(_reachable_tensors(self.engine))
        rest = {k: v for k, v in everything.items() if k not in weights and k not in optim}
        self.bytes = {"weights": sum(weights.values()), "optimizer": sum(optim.values()),
                      "grads": sum(rest.values())}


def _trainer_in(layout: list[str], shape: list[str], steps: int, run_dir: str):
    """A fresh 2-rank trainer of the given shape and layout (the layout's precision over TINY's)."""
    from megatron.core import parallel_state

    from pretrain.config import compose
    from pretrain.train import build

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    base = [o for o in TINY if not (o.startswith("train.precision=") and any("precision" in x for x in layout))]
    return build(compose([*base, *shape, *layout, f"train.max_steps={steps}", "train.sample_tokens=0",
                          f"run.dir={run_dir}"], world_size=2))


def _measure(run_dir: str) -> dict[str, dict[str, dict[str, float]]]:
    import torch.distributed as dist

    from launch.plan import make_plan

    out = {}
    for name, layout in LAYOUTS.items():
        trainer = _trainer_in(layout, SHAPE, 2, f"{run_dir}/{name}")
        cfg = trainer.cfg
        hook = MeasureAtTheOptimizerStep(trainer.engine, step=2)
        trainer.run()
        cfg.launcher.nproc_per_node = dist.get_world_size()
        plan = make_plan(cfg).memory_gib
        out[name] = {"measured": {k: v / 1024**3 for k, v in hook.bytes.items()},
                     # ZeRO-2 frees its reduce bucket after the backward; ZeRO-3 keeps its own.
                     "planned": {"weights": plan["weights"], "optimizer": plan["optimizer"],
                                 "grads": plan["grads"] + (plan["buckets"] if cfg.parallel.zero_stage == 3 else 0)}}
        del trainer, hook
        gc.collect()
    return out


def test_memory_plan_matches_tensor_bytes_per_component(tmp_path) -> None:
    results = run_distributed(_measure, 2, str(tmp_path))[0]
    for name, r in results.items():
        print(name, {k: f"{r['measured'][k] * 1024:.2f} vs {r['planned'][k] * 1024:.2f} MiB" for k in r["planned"]})
    for name, r in results.items():
        for part, planned in r["planned"].items():
            measured = r["measured"][part]
            assert abs(planned - measured) <= 0.15 * measured, f"{name} {part}: plan {planned * 1024:.2f} MiB, " \
                                                               f"tensors {measured * 1024:.2f} MiB"


@pytest.mark.parametrize("tp", [1, 2])
def test_the_logits_term_follows_the_loss_that_runs(tp: int) -> None:
    """Bytes per logit in the plan: in bf16 the compiled loss keeps the 16-bit logits and writes a
    16-bit gradient while they are held (2 + 2), where eager adds an fp32 copy (2 + 4); what each
    keeps for its backward is measured in tests/test_model.py. In fp32 both hold 4 + 4. Under TP the
    loss is megatron-core's vocab-parallel one, which is never compiled."""
    from launch.plan import make_plan
    from pretrain.config import compose

    def bytes_per_logit(*overrides: str) -> float:
        cfg = compose([*TINY, "train.device=cpu", f"parallel.tp={tp}", *overrides], world_size=2)
        cfg.launcher.nproc_per_node = 2
        t = cfg.train
        return make_plan(cfg).memory_gib["logits"] * 1024**3 / (t.seq_len * t.micro_batch_size * cfg.model.vocab_size / tp)

    for precision, compiled_bytes in (("bf16", 4 if tp == 1 else 6), ("fp32", 8)):
        assert bytes_per_logit(f"train.precision={precision}", "model.compile=false") == pytest.approx(
            6 if precision == "bf16" else 8)
        assert bytes_per_logit(f"train.precision={precision}", "model.compile=true") == pytest.approx(compiled_bytes)


# TP with and without sequence parallelism; autocast's casts with selective recompute. (TP 1 without
# selective recompute is checked against CUDA's peak in tests/test_gpu.py; each layout here compiles anew.)
SAVED_SHAPE = ["model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=4",
               "train.seq_len=128", "train.micro_batch_size=4", "model.compile=true"]
SAVED_LAYOUTS = {"tp2": ["parallel.tp=2"], "tp2-sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
                 "tp2-bf16-autocast-selective": ["parallel.tp=2", "train.precision=bf16",
                                                 "model.activation_checkpointing=selective"]}


def _saved_for_backward(run_dir: str) -> dict[str, tuple[float, float]]:
    import torch.distributed as dist

    from launch.plan import make_plan

    out = {}
    for name, layout in SAVED_LAYOUTS.items():
        trainer = _trainer_in(layout, SAVED_SHAPE, 1, f"{run_dir}/{name}")
        cfg = trainer.cfg
        engine = trainer.engine
        weights = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
        saved: list[torch.Tensor] = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        batch = next(iter(trainer.loader))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = engine(batch.input_ids, batch.labels, batch.position_ids)
        held = {k: v for k, v in storage_bytes(saved).items() if k not in weights}
        engine.backward(loss)
        cfg.launcher.nproc_per_node = dist.get_world_size()
        plan = make_plan(cfg).memory_gib
        out[name] = (sum(held.values()) / 1024**2, (plan["activations"] + plan["logits"] + plan["casts"]) * 1024)
        del trainer, engine, saved, loss
        gc.collect()
    return out


def test_activations_logits_and_casts_match_what_autograd_saves(tmp_path) -> None:
    """The plan's activation formula (Megatron's 34 sbh split by what TP and SP divide, minus what
    selective recompute drops) and its logits and casts terms, against the bytes the forward hands
    autograd: the weights themselves excluded, views of one buffer counted once. bf16 with tp 2 runs
    autocast over fp32 weights (one DP rank: ZeRO-0), so the bf16 weight copies count."""
    results = run_distributed(_saved_for_backward, 2, str(tmp_path))[0]
    for name, (measured, planned) in results.items():
        print(f"{name}: autograd holds {measured:.2f} MiB, plan {planned:.2f} MiB")
    for name, (measured, planned) in results.items():
        assert abs(planned - measured) <= 0.15 * measured, f"{name}: plan {planned:.2f} MiB, saved {measured:.2f} MiB"
