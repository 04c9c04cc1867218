"""Training throughput of pretrain against references measured in the same run.

References, each trained with torch's AdamW on the same random batches, device and precision:
  transformers  Hugging Face LlamaForCausalLM of the same shape in a plain loop (what a user writes)
  eager         pretrain's own model in a minimal eager loop: no DeepSpeed, no framework, no compile
  megatron      megatron-core's GPTModel from its local layer spec (CUDA only; skipped elsewhere)
pretrain itself runs through `pretrain.train.build()` with a random batch source and no checkpoint
saving, timing its real optimizer step. Prints tokens/s and MFU for each and the ratio pretrain /
reference (above 1 = pretrain is faster): the median of the per-step ratios, with their quartiles.
On CPU the contenders take turns step by step, so a busy machine slows all of them alike; on a GPU
they run one after another, each alone in memory.

    python tools/benchmark.py                                             # CPU-sized default shape
    python tools/benchmark.py --hidden 768 --layers 12 --heads 12 --seq-len 256 --batch 2
    python tools/benchmark.py --preset 1b --seq-len 2048 --precision bf16 --steps 10 --json   # GPU
    python tools/benchmark.py --preset 1b --seq-len 2048 --precision bf16 --grad-accum 8      # a real global batch

A step is one optimizer step over --grad-accum micro-batches, for every contender alike. One
micro-batch per step (the default) charges the whole optimizer step to a few thousand tokens; a
run with a real global batch accumulates many micro-batches per step, and its tokens/s and MFU
are those of --grad-accum in the tens.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import pretrain.parallel  # noqa: E402,F401

# The CPU-sized default shape (no --preset), and each preset's batch shape.
DEFAULT_SHAPE = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": "null", "vocab_size": 8192}
PRESET_BATCH = {None: (256, 4), "tiny": (256, 8), "125m": (1024, 8), "1b": (2048, 4)}
REFERENCES = ("transformers", "eager", "megatron")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "125m", "1b"], default=None,
                   help="model shape from conf/model/ (default: hidden 512, 8 layers, 8 heads, vocab 8192)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="default: 256 (2048 for --preset 1b)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default depends on the preset)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="micro-batches per optimizer step, for every contender (default 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--references", default=",".join(REFERENCES),
                   help=f"comma-separated subset of {', '.join(REFERENCES)}")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra pretrain config override, e.g. model.compile=true (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after pretrain's timed steps, profile N more: its busiest kernels and how busy the device was")
    a = p.parse_args(argv)
    seq, batch = PRESET_BATCH[a.preset]
    a.seq_len, a.batch = a.seq_len or seq, a.batch or batch
    if a.grad_accum < 1:
        p.error(f"--grad-accum: {a.grad_accum} micro-batches per step; give 1 or more")
    unknown = set(a.references.split(",")) - set(REFERENCES) - {""}
    if unknown:
        p.error(f"--references: unknown {', '.join(sorted(unknown))}; choose from {', '.join(REFERENCES)}")
    return a


def model_overrides(a: argparse.Namespace) -> list[str]:
    out = [f"model={a.preset}"] if a.preset else [f"model.{k}={v}" for k, v in DEFAULT_SHAPE.items()]
    if a.heads is not None and a.kv_heads is None:  # explicit heads without kv heads: multi-head attention
        out.append("model.num_kv_heads=null")
    for key, value in [("hidden_size", a.hidden), ("num_layers", a.layers), ("num_heads", a.heads),
                       ("num_kv_heads", a.kv_heads), ("vocab_size", a.vocab)]:
        if value is not None:
            out.append(f"model.{key}={value}")
    return out


def overrides(a: argparse.Namespace, run_dir: str) -> list[str]:
    return [*model_overrides(a), f"model.max_seq_len={max(a.seq_len, 1024)}",
            f"train.seq_len={a.seq_len}", f"train.micro_batch_size={a.batch}",
            f"train.grad_accum_steps={a.grad_accum}", "train.global_batch_tokens=null", f"train.max_steps={10**9}",
            f"train.precision={a.precision}", f"parallel.zero_stage={a.zero_stage}",
            "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false",
            "checkpoint.resume=false", "logging.wandb=disabled", "optim.warmup_steps=1", f"run.dir={run_dir}",
            "data.embedded_vocab_size=1024", *a.override]


class RandomBatches:
    """Uniform random tokens, each row one document: throughput does not depend on the text.
    A pretrain.train.BatchSource."""

    def __init__(self, vocab: int, batch: int, seq_len: int) -> None:
        self.vocab, self.batch, self.seq_len = vocab, batch, seq_len
        self.skipped_shards = 0

    def __iter__(self):
        from pretrain.data import Batch

        g = torch.Generator().manual_seed(0)
        while True:
            t = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=g)
            yield Batch(t[:, :-1], t[:, 1:], torch.arange(self.seq_len).expand(self.batch, -1))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @staticmethod
    def merge_states(states: list) -> dict:
        return {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop_step(model, optimizer, batches, device: torch.device, bf16: bool, accum: int,
                    loss_of: Callable[[Any, Any], torch.Tensor]) -> Callable[[], None]:
    """One training step as a user writes it: for each of `accum` micro-batches an autocast forward
    and a backward of its share of the loss; then clip and AdamW."""

    def step() -> None:
        for _ in range(accum):
            batch = next(batches)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(model, batch) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as a loop that logs its loss does

    return step


def adamw(params, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")


def build_transformers(cfg, a, device: torch.device, bf16: bool) -> Callable[[], None]:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.kv_heads, max_position_embeddings=max(a.seq_len, 1024),
                         rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device)
    batches = iter(RandomBatches(m.vocab_size, a.batch, a.seq_len))

    def loss_of(model, batch):
        ids = batch.input_ids.to(device)
        return model(input_ids=ids, labels=ids).loss

    return plain_loop_step(model, adamw(model.parameters(), device), batches, device, bf16, a.grad_accum, loss_of)


def build_eager(cfg, a, device: torch.device, bf16: bool, backend: str) -> Callable[[], None]:
    from pretrain.model import GPT, init_weights

    model = GPT(cfg.model, attention=backend, on_cuda=device.type == "cuda").to(device)
    init_weights(model, 0, cfg.model.init_std, cfg.model.num_layers)
    batches = iter(RandomBatches(cfg.model.vocab_size, a.batch, a.seq_len))

    def loss_of(model, batch):
        return model(batch.input_ids.to(device), batch.labels.to(device), batch.position_ids)

    return plain_loop_step(model, adamw(model.parameters(), device), batches, device, bf16, a.grad_accum, loss_of)


def megatron_gpt(cfg, seq_len: int, device: torch.device):
    """megatron-core's GPTModel of the same shape, with its local (no Transformer Engine) layer spec.
    It builds on any device; its forward runs only on CUDA (its RoPE asks for the current CUDA device)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = cfg.model
    config = TransformerConfig(num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_heads,
                               num_query_groups=m.kv_heads, ffn_hidden_size=m.ffn_size, normalization="RMSNorm",
                               layernorm_epsilon=m.norm_eps, gated_linear_unit=True, activation_func=F.silu,
                               add_bias_linear=False, bias_activation_fusion=False, masked_softmax_fusion=False,
                               persist_layer_norm=False, apply_rope_fusion=False, bias_dropout_fusion=False,
                               hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_std,
                               use_cpu_initialization=device.type == "cpu",
                               # The local spec's attention is unfused: it would keep every layer's
                               # [batch, heads, seq, seq] scores for the backward, which ran the 1b preset at
                               # 4 x 2048 out of an H100's 80 GB. Recomputing them, megatron's selective
                               # recompute, is how that spec is run at long sequences.
                               recompute_granularity="selective")
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=m.vocab_size, max_sequence_length=max(seq_len, 1024), position_embedding_type="rope",
                    rotary_base=int(m.rope_theta), share_embeddings_and_output_weights=m.tie_embeddings).to(device)


def build_megatron(cfg, a, device: torch.device, bf16: bool) -> Callable[[], None]:
    """megatron_gpt in a plain loop, on CUDA."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if device.type != "cuda":
        raise RuntimeError("megatron-core's GPTModel runs only on CUDA")
    model_parallel_cuda_manual_seed(0)
    model = megatron_gpt(cfg, a.seq_len, device)
    batches = iter(RandomBatches(cfg.model.vocab_size, a.batch, a.seq_len))

    def loss_of(model, batch):
        ids, labels = batch.input_ids.to(device), batch.labels.to(device)
        return model(ids, batch.position_ids.to(device), attention_mask=None, labels=labels).float().mean()

    return plain_loop_step(model, adamw(model.parameters(), device), batches, device, bf16, a.grad_accum, loss_of)


# What a kernel (or, on CPU, an operator) does, from its name; checked in this order: cuDNN's and
# flash's attention kernels carry "sm90" too, as cuBLAS's do.
KERNEL_KINDS = (
    ("attention", re.compile(r"sdpa|flash|fmha|attention|flex", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|aten::(mm|addmm|bmm|matmul)$", re.I)),
    ("loss", re.compile(r"softmax|nll_loss|cross_entropy", re.I)),
    ("optimizer, norms (multi-tensor)", re.compile(r"adam|multi_tensor_apply|foreach", re.I)),
    ("compiled (triton)", re.compile(r"^triton_", re.I)),
    ("copies, casts", re.compile(r"memcpy|memset|copy|_to_copy|cast", re.I)),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def profile_steps(step_fn: Callable[[], None], steps: int, device: torch.device, top: int = 15) -> dict[str, Any]:
    """Where pretrain's step goes: the kernels with the most self time per step (device time on a
    GPU, CPU time on a CPU), and the device's busy time against the step's wall time. On a GPU a
    busy share well under 1 means the device waits for the host (launches, syncs), not for kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step_fn()
        _sync(device)
        wall = (time.perf_counter() - start) / steps
    if cuda:  # the kernels and copies themselves (the operators that launched them would count them twice,
        # and so would a record_function range such as Optimizer.step, shown on the device as well)
        timed = [(e.key, e.self_device_time_total) for e in prof.key_averages()
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
                 and not getattr(e, "is_user_annotation", False)]
    else:
        timed = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    per_step = sorted(((name, t / 1e6 / steps) for name, t in timed), key=lambda kv: -kv[1])  # from microseconds
    busy = sum(t for _, t in per_step)
    by_kind: dict[str, float] = {}
    for name, t in per_step:
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + t
    return {"steps": steps, "step_s": wall, "busy_s": busy, "busy_share": busy / wall,
            "by_kind": {kind: {"s_per_step": t, "share": t / wall}
                        for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "clock": "device" if cuda else "cpu (all threads' operators, self time)",
            "top": [{"name": name, "s_per_step": t, "share": t / wall} for name, t in per_step[:top]]}


def time_steps(builders: dict[str, Callable[[], Callable[[], None]]], a: argparse.Namespace, device: torch.device,
               interleave: bool) -> tuple[dict[str, list[float]], dict[str, str], dict[str, Any] | None]:
    """Seconds per timed step of each contender, round-robin (interleave) or one after another,
    each built just before its turn and freed after it; why any could not be built; and, with
    --profile, pretrain's profile (taken after its timed steps, while its model is still built)."""
    times: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    profiled: dict[str, Any] | None = None

    allocated_gib: dict[str, float] = {}  # on the GPU as each contender is built (earlier ones freed)

    def build(name: str) -> Callable[[], None] | None:
        if device.type == "cuda":
            allocated_gib[name] = torch.cuda.memory_allocated(device) / 2**30
        try:
            return builders[name]()
        except Exception as err:  # a reference that cannot run here (megatron on CPU) is reported, not fatal
            skipped[name] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            return None

    def one(name: str, step_fn: Callable[[], None], step: int) -> None:
        _sync(device)
        start = time.perf_counter()
        step_fn()
        _sync(device)
        if step >= a.warmup:
            times.setdefault(name, []).append(time.perf_counter() - start)

    def failed(name: str, err: Exception) -> None:
        """A reference that fails mid-run is reported like one that cannot be built; pretrain's own failure is fatal."""
        if name == "pretrain":
            raise err
        before = f" ({allocated_gib[name]:.1f} GiB allocated before it was built)" if name in allocated_gib else ""
        skipped[name] = f"failed while training{before}: {type(err).__name__}: {err}".splitlines()[0][:240]
        times.pop(name, None)

    if interleave:
        steps = {name: fn for name in builders if (fn := build(name)) is not None}
        for step in range(a.warmup + a.steps):
            for name, fn in list(steps.items()):
                try:
                    one(name, fn, step)
                except Exception as err:
                    failed(name, err)
                    del steps[name]
        if a.profile:
            profiled = profile_steps(steps["pretrain"], a.profile, device)
        return times, skipped, profiled
    for name in builders:
        fn = build(name)
        if fn is None:
            continue
        try:
            for step in range(a.warmup + a.steps):
                one(name, fn, step)
        except Exception as err:
            failed(name, err)
        if name == "pretrain" and a.profile:
            profiled = profile_steps(fn, a.profile, device)
        del fn  # free its model before the next one is built
        torch.compiler.reset()  # compiled graphs and their caches hold on to what they were traced with
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return times, skipped, profiled


def run(a: argparse.Namespace) -> dict[str, Any]:
    from launch.plan import parameter_count
    from pretrain.compiling import resolve_compile
    from pretrain.config import compose
    from pretrain.metrics import flops_per_token, peak_flops
    from pretrain.model.attention import resolve_backend
    from pretrain.precision import describe_precision
    from pretrain.train import build

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(overrides(a, run_dir))
        trainer = build(cfg, batches=RandomBatches(cfg.model.vocab_size, a.batch, a.seq_len))
        device, precision = trainer.dims.device, trainer.precision
        engine_stage = trainer.engine.zero_optimization_stage()  # ZeRO-1/2 on one rank run as ZeRO-0
        engine_accum = trainer.engine.gradient_accumulation_steps()
        bf16 = precision == "bf16"
        backend = resolve_backend(cfg.model.attention, device, precision)
        held = [trainer]  # released once pretrain has been timed on a GPU
        del trainer

        def pretrain_step() -> Callable[[], None]:
            trainer = held.pop()
            batches = iter(trainer.loader)
            return lambda: trainer.train_step(batches)

        builders = {"pretrain": pretrain_step,
                    "transformers": lambda: build_transformers(cfg, a, device, bf16),
                    "eager": lambda: build_eager(cfg, a, device, bf16, backend),
                    "megatron": lambda: build_megatron(cfg, a, device, bf16)}
        wanted = ["pretrain"] + [r for r in a.references.split(",") if r]
        interleave = device.type != "cuda"
        times, skipped, profiled = time_steps({name: builders[name] for name in wanted}, a, device, interleave)
    n_params = parameter_count(cfg.model)
    flops = flops_per_token(cfg.model, n_params, a.seq_len)
    # One peak for all, measured after all ran (on CPU it is a measured matmul rate).
    peak = peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    tokens = a.batch * a.seq_len * a.grad_accum  # per optimizer step
    medians = {name: statistics.median(t) for name, t in times.items()}
    results = {name: {"tokens_per_s": tokens / step, "mfu": flops * tokens / step / peak, "step_s": step}
               for name, step in medians.items()}
    ratios, spreads = step_ratios(times, interleave)
    return {
        "model": dict(dataclasses.asdict(cfg.model), parameters=n_params),
        "seq_len": a.seq_len, "batch": a.batch, "grad_accum": a.grad_accum, "engine_grad_accum": engine_accum,
        "steps": a.steps, "warmup": a.warmup,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "precision_mode": describe_precision(precision, engine_stage),
        "zero_stage": a.zero_stage, "engine_zero_stage": engine_stage,
        "attention": backend,
        "compile": resolve_compile(cfg.model.compile, device, cfg.parallel.zero_stage),
        "peak_flops": peak, "timing": "interleaved" if interleave else "sequential",
        "versions": package_versions(), "results": results, "skipped": skipped,
        "ratios": ratios, "ratio_quartiles": spreads,
        **({"profile": profiled} if profiled else {}),
    }


def step_ratios(times: dict[str, list[float]], interleaved: bool) -> tuple[dict[str, float], dict[str, list[float]]]:
    """pretrain's speed over each reference's, and the quartiles of that ratio over the timed steps.

    Interleaved (CPU), step i of every contender ran back to back, so a reference's step time over
    pretrain's step i is one paired ratio in which a busy spell slows both sides: their median is
    far steadier on a shared machine than a ratio of two medians. Sequential (GPU) runs pair
    nothing: each step's ratio is taken against pretrain's median step."""
    ours = times["pretrain"]
    ours_median = statistics.median(ours)
    ratios, spreads = {}, {}
    for name, theirs in times.items():
        if name == "pretrain":
            continue
        per_step = [t / o for o, t in zip(ours, theirs)] if interleaved else [t / ours_median for t in theirs]
        # inclusive: quartiles within the measured ratios (the default method extrapolates past them,
        # even below zero, when a few steps include one slow outlier)
        q1, q2, q3 = statistics.quantiles(per_step, n=4, method="inclusive") if len(per_step) > 1 else per_step * 3
        ratios[name], spreads[name] = q2, [q1, q3]
    return ratios, spreads


def package_versions() -> dict[str, str]:
    """The installed versions of what the contenders run on: a ratio against a reference holds for
    that version of it, and its speed moves from release to release."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "deepspeed", "megatron-core", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def table(report: dict[str, Any]) -> str:
    m = report["model"]
    lines = [f"model: hidden {m['hidden_size']}, layers {m['num_layers']}, heads {m['num_heads']}"
             f"/{m['num_kv_heads'] or m['num_heads']}, vocab {m['vocab_size']}, {m['parameters'] / 1e6:.1f}M params | "
             f"seq {report['seq_len']} x batch {report['batch']} x accum {report['grad_accum']} | "
             f"{report['device']} {report['precision_mode']} | "
             f"ZeRO-{report['zero_stage']}"
             + (f" (engine ZeRO-{report['engine_zero_stage']})" if report['engine_zero_stage'] != report['zero_stage']
                else "") + f" | attention {report['attention']} | compile {report['compile']} | "
             f"{report['timing']}, median of {report['steps']} steps",
             "versions: " + ", ".join(f"{name} {v}" for name, v in report["versions"].items())]
    for name, r in report["results"].items():
        ratio = report["ratios"].get(name)
        spread = report["ratio_quartiles"].get(name)
        lines.append(f"{name:>12}: {r['tokens_per_s']:10,.0f} tokens/s  MFU {100 * r['mfu']:5.1f}%"
                     + (f"  pretrain/{name} = {ratio:.2f} (quartiles {spread[0]:.2f}-{spread[1]:.2f})"
                        if ratio else ""))
    lines += [f"{name:>12}: skipped ({why})" for name, why in report["skipped"].items()]
    if "profile" in report:
        lines += profile_lines(report["profile"])
    return "\n".join(lines)


def profile_lines(prof: dict[str, Any]) -> list[str]:
    """The --profile section of the table (tools/gpu_check.py prints it too)."""
    lines = [f"profile of pretrain, {prof['steps']} step(s): {prof['step_s'] * 1e3:,.1f} ms per step, "
             f"{prof['clock']} busy {prof['busy_s'] * 1e3:,.1f} ms ({100 * prof['busy_share']:.0f}%)"]
    lines.append("  by kind: " + " | ".join(f"{kind} {100 * k['share']:.1f}%" for kind, k in prof["by_kind"].items()))
    lines += [f"  {100 * k['share']:5.1f}%  {k['s_per_step'] * 1e3:9.2f} ms  {k['name'][:100]}" for k in prof["top"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr if a.json else sys.stdout):  # --json: stdout is the JSON alone
        report = run(a)
    print(json.dumps(report, indent=1) if a.json else table(report), flush=True)
    from pretrain.parallel.groups import destroy

    destroy()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
