"""What every multi-process test uses: run a function in N gloo processes, train in-process,
and feed identical synthetic batches to a DP layout and to its single-process reference."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A model small enough that a 4-process test step takes milliseconds on 2 cores.
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.vocab_size=1024", "data.embedded_vocab_size=1024", "train.seq_len=32",
        "train.micro_batch_size=2", "train.eval_interval=0", "checkpoint.interval=0",
        "optim.warmup_steps=2", "train.log_interval=1000", "logging.wandb=disabled", "train.device=cpu",
        "train.precision=fp32"]

# Seconds before a test calls a subprocess or rank hung. A guard, never a timing: runs that take a
# minute on an idle 2-core machine take 5-10 times that with another CPU-heavy job beside them.
HUNG = 1200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storage_bytes(tensors) -> dict[int, int]:
    """Bytes of the CPU tensors given, by storage: views of one buffer count once, and an empty
    (released) tensor not at all."""
    out = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type == "cpu":
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    out.pop(0, None)
    return out


def _worker(fn: Callable, rank: int, world: int, port: int, args: tuple, queue) -> None:
    # Every rank, rank 0 included, joins the store run_distributed holds, as torchrun's workers join their agent's.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    try:
        # As bytes (between processes only, never on disk): a tensor put on the queue as itself travels
        # as a file descriptor that this process must still be alive to hand over, which a loaded
        # machine showed it sometimes no longer is.
        queue.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # report any failure, including SystemExit, to the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from pretrain.parallel.groups import destroy

        destroy()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = HUNG) -> list[Any]:
    """Run fn(*args) on world_size gloo ranks; return the per-rank results (rank order)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # The ranks' rendezvous store listens on a port the kernel chose and this process holds until the
    # ranks are done. A port found free here and bound later by rank 0 could be taken in between by any
    # process on the machine: under load, a rank's start-up takes seconds and that happened.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, store.port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(value)  # from this test's own child process
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 5)
            if p.is_alive():
                p.kill()
        del store
    if errors:
        raise AssertionError("distributed worker failed: " + "\n".join(errors))
    return [results[r] for r in range(world_size)]


class SyntheticBatches:
    """Random token batches, identical for a given (seed, step, DP rank) in any layout.

    `ranks` lists the DP ranks whose micro-batches this process concatenates: a DP=2 run gives
    rank r [r]; its single-process reference gives [0, 1] and so sees the same global batch.
    """

    skipped_shards = 0  # the loader interface the trainer logs; synthetic batches have no shards

    def __init__(self, vocab: int, seq_len: int, micro_batch: int, ranks: list[int], seed: int = 0,
                 accum: int = 1) -> None:
        self.vocab, self.seq_len, self.micro_batch, self.ranks, self.seed = vocab, seq_len, micro_batch, ranks, seed
        self.accum = accum  # a step's rows per rank are micro_batch * accum, yielded in accum pieces
        self.skipped_shards = 0  # a pretrain.train.BatchSource: no shards, none skipped

    def _one(self, step: int, rank: int):
        # Arithmetic progressions mod vocab: random, but learnable, so losses fall within a few steps.
        g = torch.Generator().manual_seed(self.seed * 1_000_000 + step * 100 + rank)
        rows = self.micro_batch * self.accum
        start = torch.randint(0, self.vocab, (rows, 1), generator=g)
        stride = torch.randint(1, 4, (rows, 1), generator=g)
        tokens = (start + stride * torch.arange(self.seq_len + 1)) % self.vocab
        return tokens[:, :-1], tokens[:, 1:]

    def __iter__(self):
        from pretrain.data import Batch

        step = 0
        while True:
            parts = [self._one(step, r) for r in self.ranks]
            for piece in range(self.accum):
                rows = slice(piece * self.micro_batch, (piece + 1) * self.micro_batch)
                ids = torch.cat([p[0][rows] for p in parts])
                labels = torch.cat([p[1][rows] for p in parts])
                yield Batch(input_ids=ids, labels=labels, position_ids=torch.arange(self.seq_len).expand_as(ids))
            step += 1

    def state_dict(self) -> dict:
        return {}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def train(overrides: list[str], run_dir: str, synthetic: bool | list[int] = False) -> tuple[list[dict], Any]:
    """Build and run a trainer in this process (a rank of run_distributed, or alone).

    synthetic=True feeds this DP rank's synthetic batches; a list of DP ranks concatenates theirs
    (the single-process reference of a DP run).
    """
    from pretrain.config import compose
    from pretrain.train import build

    # Each run compiles its blocks as a fresh process would. Graphs left by an earlier run of
    # another shape would make dynamo recompile this one with dynamic shapes: other kernels, whose
    # last-bit differences would break the bit-exact comparisons between runs.
    torch.compiler.reset()
    cfg = compose([*overrides, f"run.dir={run_dir}"], world_size=int(os.environ.get("WORLD_SIZE", "1")))
    trainer = build(cfg)
    if synthetic is not False:
        ranks = [trainer.dims.dp_rank] if synthetic is True else synthetic
        trainer.loader = SyntheticBatches(cfg.model.vocab_size, cfg.train.seq_len,
                                          cfg.train.micro_batch_size // len(ranks), ranks, seed=cfg.train.seed,
                                          accum=trainer.engine.gradient_accumulation_steps())
    records = trainer.run()
    return records, trainer


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]
