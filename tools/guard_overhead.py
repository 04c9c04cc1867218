#!/usr/bin/env python
"""What the loss guard costs per step: its judge + gate + read against the plain loss average it
replaced (one all-reduce and one read of the DP-mean loss), measured in the same process.

    python tools/guard_overhead.py [--steps 2000] [--device cpu|cuda]

On CUDA it also runs the guard under torch.cuda.set_sync_debug_mode("error"), which raises on any
host-device synchronisation: the guard's judge and gate must pass it (the read is the one transfer
per step the loop already had).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from pretrain.config import GuardConfig
    from pretrain.guard import StepGuard

    device = torch.device(args.device)
    # A world of one in an in-process store, as pretrain.parallel.groups.init_distributed runs one: no port.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    param = torch.nn.Parameter(torch.ones(1 << 20, device=device))
    optimizer = torch.optim.AdamW([param], lr=1e-3, fused=True)
    param.grad = torch.full_like(param, 1e-3)
    losses = [torch.tensor(2.0 + 0.01 * (i % 7), device=device) for i in range(16)]

    def plain(i: int) -> float:
        value = losses[i % 16].clone()
        dist.all_reduce(value)
        optimizer.step()
        return value.item()

    guard = StepGuard(GuardConfig(), device)

    def guarded(i: int) -> float:
        guard.gate(optimizer, guard.judge(losses[i % 16], 1, None))
        optimizer.step()
        return guard.read().loss

    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        guard.gate(optimizer, guard.judge(losses[0], 1, None))
        optimizer.step()
        torch.cuda.set_sync_debug_mode(0)
        print("judge + gate + fused step under set_sync_debug_mode('error'): no host-device sync")
    timings = {"plain": float("inf"), "guarded": float("inf")}
    for _ in range(5):  # alternate, keep the best of each: a loaded machine adds noise, never speed
        for name, fn in (("plain", plain), ("guarded", guarded)):
            for i in range(20):
                fn(i)
            start = time.perf_counter()
            for i in range(args.steps):
                fn(i)
            timings[name] = min(timings[name], (time.perf_counter() - start) / args.steps * 1e6)
    print(f"device {device}: per step, incl. a fused AdamW step over 1M parameters: plain loss average "
          f"{timings['plain']:.1f} us, with the guard {timings['guarded']:.1f} us "
          f"(ratio {timings['guarded'] / timings['plain']:.3f}, +{timings['guarded'] - timings['plain']:.1f} us)")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
