"""The lm-eval adapter (pretrain/evals/lm.py) against direct computation with the model, at TP=2:
greedy generation is the argmax loop and stops at the `until` strings, at max_gen_toks and at the
end-of-text token; rolling loglikelihood is the sum of every token's log-probability, each token
scored once, from a window of at most max_length tokens."""

from __future__ import annotations

import os

import torch

from helpers import run_distributed

GEN_TOKENS = 12
WINDOW = 16  # max_length for the multi-window rolling case


class CountingModel(torch.nn.Module):
    """The model, counting forward passes (each generated token costs one)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(input_ids)


def _adapter_checks(data_dir: str, texts: list[str]) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F
    from lm_eval.api.instance import Instance
    from megatron.core import parallel_state

    from pretrain.config import ModelConfig
    from pretrain.data import load_tokenizer
    from pretrain.data.tokenizer import eos_id
    from pretrain.evals.lm import PretrainLM
    from pretrain.model import GPT
    from pretrain.model.init import init_weights
    from pretrain.parallel.groups import init_distributed

    init_distributed(2, "cpu")
    tok = load_tokenizer(data_dir)
    eot = eos_id(tok)
    torch.manual_seed(0)
    model = GPT(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=1024,
                            max_seq_len=256), attention="sdpa").eval()
    init_weights(model, seed=0, init_std=0.2, num_layers=2)  # peaked distributions: varied greedy text
    counting = CountingModel(model)

    @torch.no_grad()
    def log_probs(ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] next-token log-probabilities, straight from the model."""
        local = model(torch.tensor([ids]))[0]
        parts = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        return F.log_softmax(torch.cat(parts, dim=-1).float(), dim=-1)

    def greedy_ids(prompt: str, limit: int) -> list[int]:
        ids, out = tok.encode(prompt).ids, []
        while len(out) < limit:
            nxt = int(log_probs(ids + out)[-1].argmax())
            if nxt == eot:
                break
            out.append(nxt)
        return out

    def greedy(prompt: str, limit: int) -> str:
        return tok.decode(greedy_ids(prompt, limit))

    def generate(lm: PretrainLM, requests: list[tuple[str, dict]]) -> tuple[list[str], int]:
        counting.calls = 0
        instances = [Instance("generate_until", {}, (ctx, kw), i) for i, (ctx, kw) in enumerate(requests)]
        return lm.generate_until(instances, disable_tqdm=True), counting.calls

    lm = PretrainLM(counting, tok, max_length=256, device=torch.device("cpu"), batch_size=2,
                    max_gen_toks=GEN_TOKENS)
    prompts = [texts[0][:20], texts[0][20:45], texts[0][45:60]]
    plain = [greedy(p, GEN_TOKENS) for p in prompts]
    never = {"until": ["\x00never"]}
    # three requests in two batches: the default limit, an explicit limit, and a limit of 5
    batched, _ = generate(lm, [(prompts[0], never), (prompts[1], dict(never, max_gen_toks=GEN_TOKENS)),
                               (prompts[2], dict(never, max_gen_toks=5))])
    short = greedy(prompts[2], 5)
    # `until`: the text of a greedy token from the 4th on; generation stops where it first appears
    gen_ids = greedy_ids(prompts[1], GEN_TOKENS)
    index = next(i for i in range(3, len(gen_ids)) if tok.decode([gen_ids[i]]).strip())
    stop = tok.decode([gen_ids[index]])
    [until_text], calls = generate(lm, [(prompts[1], {"until": [stop], "max_gen_toks": GEN_TOKENS})])

    # rolling loglikelihood: one window (the text is shorter than max_length) ...
    one = tok.encode(texts[1]).ids
    direct_one = log_probs([eot] + one[:-1]).gather(1, torch.tensor(one)[:, None]).sum().item()
    [rolling_one] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (texts[1],), 0)],
                                             disable_tqdm=True)
    # ... and several: each chunk of WINDOW tokens scored from the WINDOW tokens that end just before it ends
    small = PretrainLM(model, tok, max_length=WINDOW, device=torch.device("cpu"), batch_size=3)
    many = tok.encode(texts[2]).ids
    full, direct_many = [eot] + many, 0.0
    for start in range(0, len(many), WINDOW):
        end = min(start + WINDOW, len(many))
        lp = log_probs(full[max(0, end - WINDOW):end])[-(end - start):]
        direct_many += lp.gather(1, torch.tensor(many[start:end])[:, None]).sum().item()
    [rolling_many] = small.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (texts[2],), 0)],
                                                 disable_tqdm=True)
    return dict(plain=plain, batched=batched, short=short, stop=stop, until_text=until_text, calls=calls,
                stop_index=index, rolling=[(rolling_one, direct_one), (rolling_many, direct_many)],
                sizes=(len(one), len(many)))


def test_generate_until_and_loglikelihood_rolling_match_direct_computation() -> None:
    from pretrain.data import prepare_embedded_corpus

    data_dir = prepare_embedded_corpus(os.environ["PRETRAIN_CACHE"], vocab_size=1024)
    source = open(os.__file__, encoding="utf-8").read()
    texts = [source[:200], source[200:260], source[260:560]]
    got = run_distributed(_adapter_checks, 2, str(data_dir), texts)[0]

    plain, batched = got["plain"], got["batched"]
    assert batched[:2] == plain[:2]  # the argmax loop, to max_gen_toks (default and explicit)
    assert batched[2] == got["short"] and len(got["short"]) < len(plain[2])  # max_gen_toks=5
    assert all(len(text) > 0 for text in plain)
    # until: the text before the stop string's first appearance, and generation stopped there
    assert got["stop"] in plain[1]
    assert got["until_text"] == plain[1].split(got["stop"])[0]
    assert got["calls"] <= got["stop_index"] + 1 < GEN_TOKENS  # one forward per token, none after the stop
    # fp32 sums of the same log-probabilities, batched with padding against one row at a time
    (rolling_one, direct_one), (rolling_many, direct_many) = got["rolling"]
    assert got["sizes"][0] < 256 and got["sizes"][1] > 3 * WINDOW
    assert abs(rolling_one - direct_one) < 1e-3, (rolling_one, direct_one)
    assert abs(rolling_many - direct_many) < 1e-3, (rolling_many, direct_many)
    assert rolling_many < -got["sizes"][1]  # a real sum of negative log-probabilities, not 0
