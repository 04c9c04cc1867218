"""Training throughput of pretrain against a reference measured in the same run.

The reference is Hugging Face transformers' LlamaForCausalLM of the same shape, trained with
torch's AdamW in a plain loop: what a user would write by hand. Both run in this process on the
same device and precision, on the same random batches. Prints absolute tokens/s and MFU for both
and the ratio pretrain / reference (above 1 = faster).

    python tools/benchmark.py                                   # CPU-sized default
    python tools/benchmark.py --hidden 768 --layers 12 --seq-len 512 --batch 2
    python tools/benchmark.py --hidden 2048 --layers 16 --heads 16 --seq-len 2048 --batch 8   # GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import pretrain.parallel  # noqa: E402,F401


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--zero-stage", type=int, default=0)
    return p.parse_args(argv)


def overrides(a: argparse.Namespace, run_dir: str) -> list[str]:
    kv = a.kv_heads or a.heads
    return [f"model.hidden_size={a.hidden}", f"model.num_layers={a.layers}", f"model.num_heads={a.heads}",
            f"model.num_kv_heads={kv}", f"model.vocab_size={a.vocab}", f"model.max_seq_len={max(a.seq_len, 1024)}",
            f"train.seq_len={a.seq_len}", f"train.micro_batch_size={a.batch}",
            f"train.max_steps={a.warmup + a.steps}", f"train.precision={a.precision}",
            f"parallel.zero_stage={a.zero_stage}", "train.eval_interval=0", "checkpoint.interval=0",
            "checkpoint.resume=false", "logging.wandb=disabled", "train.log_interval=1000000",
            "optim.warmup_steps=1", f"run.dir={run_dir}", "data.embedded_vocab_size=1024"]


class RandomBatches:
    """Uniform random tokens: throughput does not depend on the text."""

    def __init__(self, vocab: int, batch: int, seq_len: int, device: torch.device) -> None:
        self.vocab, self.batch, self.seq_len, self.device = vocab, batch, seq_len, device

    def __iter__(self):
        from pretrain.data import Batch

        g = torch.Generator().manual_seed(0)
        while True:
            t = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=g)
            yield Batch(t[:, :-1], t[:, 1:], torch.arange(self.seq_len).expand(self.batch, -1))

    def state_dict(self) -> dict:
        return {}

    @staticmethod
    def merge_states(states: list) -> dict:
        return {}


def bench_pretrain(a: argparse.Namespace) -> tuple[float, str, torch.device]:
    from pretrain.config import compose
    from pretrain.train import build

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(overrides(a, run_dir))
        trainer = build(cfg)
        trainer.loader = RandomBatches(a.vocab, a.batch, a.seq_len, trainer.dims.device)
        trainer.save = lambda: None  # the benchmark measures training, not checkpoint I/O
        records = trainer.run()
    timed = records[a.warmup:]
    step_time = statistics.median(r["step_time"] for r in timed)
    return a.batch * a.seq_len / step_time, trainer.precision, trainer.dims.device


def bench_reference(a: argparse.Namespace, precision: str, device: torch.device) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    kv = a.kv_heads or a.heads
    from pretrain.config import ModelConfig

    ffn = ModelConfig(hidden_size=a.hidden, num_heads=a.heads).ffn_size
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=ffn, num_hidden_layers=a.layers,
                         num_attention_heads=a.heads, num_key_value_heads=kv, max_position_embeddings=max(a.seq_len, 1024),
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=device.type == "cuda")
    batches = iter(RandomBatches(a.vocab, a.batch, a.seq_len, device))
    times = []
    for step in range(a.warmup + a.steps):
        batch = next(batches)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(input_ids=batch.input_ids.to(device), labels=batch.input_ids.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
    return a.batch * a.seq_len / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from pretrain.config import ModelConfig
    from pretrain.metrics import flops_per_token, peak_flops
    from launch.plan import parameter_count

    ours_tps, precision, device = bench_pretrain(a)
    ref_tps = bench_reference(a, precision, device)
    mcfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                       num_kv_heads=a.kv_heads)
    flops = flops_per_token(mcfg, parameter_count(mcfg), a.seq_len)
    # One peak for both, measured after both ran (on CPU it is a measured matmul rate).
    peak = peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    print(f"model: hidden {a.hidden}, layers {a.layers}, heads {a.heads}, vocab {a.vocab}, "
          f"{parameter_count(mcfg) / 1e6:.1f}M params | seq {a.seq_len} x batch {a.batch} | {device.type} {precision}")
    print(f"pretrain : {ours_tps:10,.0f} tokens/s  MFU {100 * flops * ours_tps / peak:5.1f}%")
    print(f"reference: {ref_tps:10,.0f} tokens/s  MFU {100 * flops * ref_tps / peak:5.1f}%  (transformers Llama + AdamW)")
    print(f"ratio pretrain/reference: {ours_tps / ref_tps:.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
