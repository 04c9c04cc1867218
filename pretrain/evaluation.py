"""Held-out loss in nats per token, and in bits per byte, which does not depend on the tokenizer.

bits/byte = (sum of token losses in nats) / ln 2 / (UTF-8 bytes those tokens decode to), so two
models with different vocabularies compare on one scale. The in-run evaluation (pretrain.train)
and tools/evaluate.py share `EvalSums`, so the tool reproduces the run's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens and unused embedding rows).

    Byte-level BPE writes each byte as one character of its alphabet, so a token's length in
    characters is its length in bytes; other tokenizers are measured by decoding the token.
    """
    size = max(vocab_size or 0, tokenizer.get_vocab_size())
    lengths = np.zeros(size, dtype=np.int64)
    byte_level = type(tokenizer.pre_tokenizer).__name__ == "ByteLevel"
    special = {tok.content for tok in tokenizer.get_added_tokens_decoder().values() if tok.special}
    for token, i in tokenizer.get_vocab().items():
        if token in special:
            continue
        lengths[i] = len(token) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return torch.from_numpy(lengths)


@dataclass
class EvalResult:
    loss: float
    """Mean next-token loss in nats."""
    bits_per_byte: float
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


class EvalSums:
    """Running sums over evaluated batches: nats, tokens, bytes (as one tensor, for all_reduce)."""

    def __init__(self, byte_lengths: torch.Tensor, device: torch.device) -> None:
        self.byte_lengths = byte_lengths.to(device)
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, mean_loss: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.numel()
        nbytes = self.byte_lengths[labels.to(self.byte_lengths.device)].sum()
        self.totals += torch.stack([mean_loss.detach().double() * n,
                                    torch.tensor(n, dtype=torch.float64, device=self.totals.device),
                                    nbytes.double()])

    def result(self) -> EvalResult:
        nats, tokens, nbytes = self.totals.tolist()
        bpb = nats / math.log(2) / nbytes if nbytes else float("nan")
        return EvalResult(loss=nats / tokens, bits_per_byte=bpb, tokens=int(tokens), bytes=int(nbytes))


def text_windows(documents: Iterable[list[int]], eos: int, seq_len: int,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Raw documents -> (input_ids, labels, position_ids) windows of up to seq_len, each [1, s].

    Documents are joined with <|endoftext|> after each, as in training, and cut into consecutive
    windows so that every token is predicted exactly once; positions restart after each EOS.
    """
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        stream.append(eos)
    tokens = torch.tensor(stream, dtype=torch.long)
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[0] = True
    starts[1:] = tokens[:-1] == eos
    for begin in range(0, len(tokens) - 1, seq_len):
        window = tokens[begin:begin + seq_len + 1]
        inputs, labels = window[:-1], window[1:]
        first = starts[begin:begin + len(inputs)].clone()
        first[0] = True
        # position = distance from the latest document start at or before each token
        index = torch.arange(len(inputs))
        last_start = torch.cummax(torch.where(first, index, torch.zeros_like(index)), dim=0).values
        yield inputs[None], labels[None], (index - last_start)[None]


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids, labels, position_ids) -> mean loss over the batch's tokens."""


@torch.no_grad()
def evaluate_batches(loss_of: LossFn, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     byte_lengths: torch.Tensor, device: torch.device) -> EvalSums:
    sums = EvalSums(byte_lengths, device)
    for input_ids, labels, position_ids in batches:
        labels = labels.to(device)
        sums.add(loss_of(input_ids.to(device), labels, position_ids.to(device)), labels)
    return sums


EVAL_READING = {"shuffle_shards": 0}
"""How evaluation reads a split (TokenLoader options over the run's own): each rank's shards in file
order, as one stream cut into rows. It needs no mixing, and every row gets documents however few a
shard holds, where rows that take turns over the documents of a shard group can be dealt none."""


def dataset_batches(data_dir, split: str, seq_len: int, micro_batch_size: int, dp: int, batches: int, seed: int,
                    **loader_options: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches a run with `dp` data-parallel ranks evaluates: each rank's first `batches`
    micro-batches of the split, rank after rank, so one process sees what the whole job saw.
    loader_options: further TokenLoader options (EVAL_READING's take precedence)."""
    from pretrain.data import TokenLoader

    options = {**loader_options, **EVAL_READING}
    for rank in range(dp):
        loader = iter(TokenLoader(data_dir, split, seq_len, micro_batch_size, rank, dp, seed=seed, **options))
        for _ in range(batches):
            batch = next(loader)
            yield batch.input_ids, batch.labels, batch.position_ids
