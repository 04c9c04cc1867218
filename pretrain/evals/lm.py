"""An lm-eval model over our GPT, in any TP x DP layout: loglikelihood, rolling loglikelihood and
greedy generation, so the harness's tasks (ours or a user's local YAML) score a model during
training or from a checkpoint.

Data parallelism is lm-eval's own: each DP rank is an lm-eval rank (rank = DP rank, world size = DP
size) and gets its share of the requests; the TP ranks of one DP rank see the same requests and
run the same forward passes, each holding a vocabulary shard of the logits, which are gathered
over the TP group. Every DP rank runs the same number of forward passes (ZeRO-3 gathers weights
collectively): lm-eval pads the requests to equal counts, and generation agrees on when all
ranks are done.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from megatron.core import parallel_state
from tokenizers import Tokenizer

from pretrain.data.tokenizer import eos_id


class PretrainLM(TemplateLM):
    """lm-eval's view of a GPT (the module under the DeepSpeed engine, or a plain one)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_length: int, device: torch.device,
                 batch_size: int = 16, max_gen_toks: int = 64) -> None:
        super().__init__()
        self.model, self.tok = model, tokenizer
        self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
        self._device = device
        self._eot = eos_id(tokenizer)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        self._rank = parallel_state.get_data_parallel_rank()
        self._world_size = parallel_state.get_data_parallel_world_size()

    # --- tokenization ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return "pretrain-bpe"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=False)

    # --- lm-eval's collectives, over the data-parallel group ------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        group = parallel_state.get_data_parallel_group()
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        parts: list[Any] = [None] * self._world_size
        dist.all_gather_object(parts, obj, group=parallel_state.get_data_parallel_group())
        return parts if self._rank == dst else None

    def barrier(self) -> None:
        dist.barrier(group=parallel_state.get_data_parallel_group())

    # --- forward ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded rows -> log-softmax over the full vocabulary, [b, s, vocab], fp32."""
        width = max(len(r) for r in rows)
        width = -(-width // self.tp) * self.tp  # sequence parallelism splits the sequence over TP
        ids = torch.full((len(rows), width), self._eot, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        was_training = self.model.training
        self.model.eval()
        # Eager even where the blocks are compiled (model.compile): every batch has its own width,
        # and each would recompile them.
        with torch.compiler.set_stance("force_eager"):
            logits = self.model(ids.to(self._device)).float()  # [b, s, vocab / tp]
        self.model.train(was_training)
        if self.tp > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp)]
            dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
        return F.log_softmax(logits, dim=-1).cpu()

    def _batches(self, n: int) -> Iterator[range]:
        for start in range(0, n, self.batch_size):
            yield range(start, min(n, start + self.batch_size))

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context, continuation) token lists -> (sum log p(continuation), continuation is greedy)."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for batch in self._batches(len(order)):
            idx = [order[i] for i in batch]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in idx]
            logp = self._log_probs(rows)
            for b, i in enumerate(idx):
                cont = pairs[i][1]
                n, end = len(cont), len(rows[b])
                piece = logp[b, end - n:end]  # the positions that predict the continuation
                target = torch.tensor(cont)
                total = piece.gather(1, target[:, None]).sum().item()
                out[i] = (total, bool((piece.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for pair in lm_utils.get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                           self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(pair))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(windows)):
            totals[i] += logp
        return totals

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        return bool(t.item())

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, one full forward per new token (no KV cache: evaluation sizes are small)."""
        results: list[str] = []
        pending = [req.args for req in requests]
        # Every DP rank runs the same number of batches and steps (ZeRO-3 forwards are collective).
        batches = len(pending) and -(-len(pending) // self.batch_size)
        t = torch.tensor([float(batches)], device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        for b in range(int(t.item())):
            chunk = pending[b * self.batch_size:(b + 1) * self.batch_size]
            kwargs = [dict(k) for _, k in chunk]
            until = [[u] if isinstance(u, str) else list(u or []) for u in (k.get("until") for k in kwargs)]
            limits = [int(k.get("max_gen_toks", self.max_gen_toks)) for k in kwargs]
            rows = [self.tok_encode(ctx) or [self._eot] for ctx, _ in chunk]
            generated: list[list[int]] = [[] for _ in chunk]
            done = [False] * len(chunk)
            while self._any_rank(not all(done)):
                inputs = [(r + g)[-self.max_length:] for r, g in zip(rows, generated)] or [[self._eot]]
                logp = self._log_probs(inputs)
                for i in range(len(chunk)):
                    if done[i]:
                        continue
                    generated[i].append(int(logp[i, len(inputs[i]) - 1].argmax()))
                    text = self.tok_decode(generated[i])
                    done[i] = (generated[i][-1] == self._eot or len(generated[i]) >= limits[i]
                               or any(u in text for u in until[i]))
            for i in range(len(chunk)):
                text = self.tok_decode([t for t in generated[i] if t != self._eot])
                for u in until[i]:
                    text = text.split(u)[0]
                results.append(text)
        return results
