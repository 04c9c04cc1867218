"""ZeRO-0 clips inside fused AdamW's update (pretrain.parallel.engine.clip_grads): the same weights
as clipping the gradients first, the way torch.nn.utils.clip_grad_norm_ does, then stepping."""

from __future__ import annotations

import copy

import pytest
import torch

from pretrain.parallel.engine import clip_grads


def _steps(model: torch.nn.Module, clip_in_step: bool, max_norm: float, steps: int = 4) -> list[float]:
    """Train `model` in place; return the pre-clip gradient norm of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    norms = []
    for step in range(steps):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
        loss = 50 * model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        if clip_in_step:
            norm = torch.nn.utils.get_total_norm(grads)
            clip_grads(optimizer, max_norm, norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if max_norm > 0 else \
                torch.nn.utils.get_total_norm(grads)
        norms.append(float(norm))
        optimizer.step()
    return norms


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0], ids=["clips", "under-the-limit", "off"])
def test_clipping_inside_the_fused_step_equals_clipping_the_gradients(max_norm: float) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))
    reference, start = copy.deepcopy(model), copy.deepcopy(model)
    norms = _steps(model, True, max_norm)
    reference_norms = _steps(reference, False, max_norm)
    if max_norm == 0.5:
        assert min(norms) > 2 * max_norm  # every step is clipped, by a factor of 2 or more
    assert norms == pytest.approx(reference_norms, rel=1e-6)
    for got, want, before in zip(model.parameters(), reference.parameters(), start.parameters()):
        assert not torch.equal(got, before)  # it trained
        # x / (1 / c) and x * c differ in the last bit of fp32; four steps of AdamW keep that tiny.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
