"""A TokenLoader run in a background process, with prefetch and pinned memory.

The worker process owns an ordinary TokenLoader and sends each batch together with the loader
state *after* that batch; the training process keeps the state of the last batch it handed
out, so checkpoints record what training consumed, not what was prefetched. The batches are the
ones the same TokenLoader gives in the training process (the worker runs the same code on the
same arguments), so ``num_workers`` never changes a loss curve.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

from pretrain.data.loader import Batch, TokenLoader
from pretrain.data.manifest import DatasetError
from pretrain.data.state import StateError
from pretrain.lifetime import die_with_parent


class BatchSource(Protocol):
    """What the training loop needs from a loader, in-process or background."""

    def __iter__(self) -> Iterator[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    @property
    def skipped_shards(self) -> int: ...


def _produce(kwargs: dict[str, Any], state: dict[str, Any] | None, read_threads: int, out: Any, stop: Any,
             parent: int) -> None:
    """Worker process body: batches with the loader state after each, until told to stop."""
    die_with_parent(parent)  # a killed training process takes its loader with it
    torch.set_num_threads(1)
    try:
        loader = TokenLoader(**kwargs)
        if read_threads > 1:  # the shards of a group are read (downloaded, decoded) concurrently
            pool = ThreadPoolExecutor(read_threads)
            for source in loader.sources:
                source.prefetch = pool
        if state is not None:
            loader.load_state_dict(state)
        for batch in loader:
            tokens = torch.cat([batch.input_ids, batch.labels[:, -1:]], dim=1).numpy()
            item = ("batch", tokens, batch.position_ids.numpy(), loader.state_dict(), loader.skipped_shards)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue_mod.Full:
                    continue
            if stop.is_set():
                return
    except BaseException as e:  # reported to the training process, which raises it
        out.put(("error", type(e).__name__, str(e)))


class BackgroundLoader:
    """TokenLoader's interface, with the batches prepared ``prefetch`` ahead in another process.

    ``read_threads`` shards are read at once inside that process (useful for pipe:/http shards).
    ``pin_memory`` pins each batch so a CUDA copy can run asynchronously.
    """

    def __init__(self, prefetch: int = 4, read_threads: int = 1, pin_memory: bool = False, **kwargs: Any):
        self._kwargs = kwargs
        self._prefetch, self._read_threads, self._pin = max(1, prefetch), read_threads, pin_memory
        self._local = TokenLoader(**kwargs)  # validates the arguments here, and serves state/merge
        self._state: dict[str, Any] | None = None
        self._skipped = 0
        self._worker: mp.process.BaseProcess | None = None
        self._stop: Any = None

    merge_states = staticmethod(TokenLoader.merge_states)

    @property
    def skipped_shards(self) -> int:
        return self._skipped

    @property
    def sources(self):
        return self._local.sources

    def state_dict(self) -> dict[str, Any]:
        return self._state if self._state is not None else self._local.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._local.load_state_dict(state)  # refuses a state that does not fit, in this process
        self.close()
        self._state = self._local.state_dict()  # this rank's own state: the worker starts from it

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        ctx = mp.get_context("spawn")  # never fork a process that holds threads and process groups
        out, self._stop = ctx.Queue(maxsize=self._prefetch), ctx.Event()
        start = self._state if self._state is not None else None
        self._worker = ctx.Process(target=_produce,
                                   args=(self._kwargs, start, self._read_threads, out, self._stop, os.getpid()),
                                   daemon=True)
        self._worker.start()
        worker = self._worker
        while True:
            try:
                item = out.get(timeout=1.0)
            except queue_mod.Empty:
                if not worker.is_alive():
                    raise RuntimeError(f"the data loader process exited with code {worker.exitcode}") from None
                continue
            if item[0] == "error":
                _, kind, message = item
                raise (DatasetError if kind == "DatasetError" else StateError if kind == "StateError" else RuntimeError)(
                    message if kind in ("DatasetError", "StateError") else f"data loader process: {kind}: {message}")
            _, tokens, positions, self._state, self._skipped = item
            tokens, positions = torch.from_numpy(tokens), torch.from_numpy(positions)
            if self._pin:
                tokens, positions = tokens.pin_memory(), positions.pin_memory()
            yield Batch(tokens[:, :-1], tokens[:, 1:], positions)

    def close(self) -> None:
        """Stop the worker process (also done when a new iteration starts)."""
        if self._worker is not None:
            self._stop.set()
            self._worker.join(timeout=10)
            if self._worker.is_alive():
                self._worker.kill()
                self._worker.join()
            self._worker = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def make_loader(num_workers: int = 0, prefetch: int = 4, pin_memory: bool = False, **kwargs: Any) -> BatchSource:
    """TokenLoader in this process (num_workers=0) or in a background process reading
    ``num_workers`` shards at a time."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return TokenLoader(**kwargs)
    return BackgroundLoader(prefetch=prefetch, read_threads=num_workers, pin_memory=pin_memory, **kwargs)
