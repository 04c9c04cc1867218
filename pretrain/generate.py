"""Sampling text from the model: greedy, temperature, top-k and top-p (nucleus).

A plain loop that runs the whole window through the model for every new token (no KV cache):
for the small models this system trains on a laptop that costs milliseconds, and it calls the
same forward the training step calls, so what it samples is what was trained. `next_token`
is shared with the end-of-run sample, which runs on every rank of a parallel job.
"""

from __future__ import annotations

from typing import Callable

import torch

Logits = Callable[[torch.Tensor], torch.Tensor]
"""input ids [1, s] -> logits of the last position [1, vocab] (full vocabulary, float)."""


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top k, or outside the smallest set with probability >= top_p, to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """[1, vocab] logits -> [1, 1] token id. temperature 0 is greedy (argmax, ties to the lowest id)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(logits_of: Logits, prompt: list[int], max_new_tokens: int, max_seq_len: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_id: int | None = None, device: torch.device | str = "cpu") -> list[int]:
    """The new token ids after `prompt`, up to max_new_tokens or `stop_id` (included when sampled).

    The window is the last max_seq_len tokens, the longest the RoPE tables were built for.
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token (start with the end-of-text id)")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    # Eager even where the blocks are compiled (model.compile): each new length would recompile them.
    with torch.compiler.set_stance("force_eager"):
        for _ in range(max_new_tokens):
            token = next_token(logits_of(ids[:, -max_seq_len:]), temperature, top_k, top_p, generator)
            ids = torch.cat([ids, token], dim=1)
            new.append(int(token))
            if stop_id is not None and new[-1] == stop_id:
                break
    return new


def last_logits(model: torch.nn.Module) -> Logits:
    """Logits of a single-process model (TP=1, so its logits cover the whole vocabulary)."""

    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(ids)[:, -1, :].float()

    return run


def parallel_logits(model: torch.nn.Module) -> Logits:
    """Logits of a model sharded over a tensor-parallel group (any TP size, any ZeRO stage).

    Every rank of the job must call it with the same ids (greedy decoding keeps them equal):
    ZeRO-3 gathers parameters and TP ranks each hold a vocabulary slice, which are joined here.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    def run(ids: torch.Tensor) -> torch.Tensor:
        local = model(ids)[:, -1, :].float().contiguous()
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
        return torch.cat(parts, dim=-1)

    return run
