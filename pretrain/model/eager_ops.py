"""Rotary embedding and RMSNorm with hand-written backward passes, for the eager (uncompiled) path.

Autograd records these elementwise chains op by op: a rotate-half RoPE is a negation, a concat,
two broadcast products and a sum, and its backward re-materialises slices into zero-filled
buffers; nn.RMSNorm on CPU is six ops each way. In a CPU training step of the default model that
was about a sixth of the time, more than attention. Written out, RoPE is a 2-D rotation whose
backward is the same rotation by the opposite angle, and RMSNorm's backward is two dot products
and two scaled sums. Under torch.compile the plain expressions are used instead: inductor fuses
them into one kernel each way.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (dimension i pairs with i + d/2, as in Hugging Face's Llama), computed in
    fp32. cos, sin: [..., d/2] fp32, broadcastable to x's leading dimensions."""
    if torch.compiler.is_compiling():
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return _Rotate.apply(x, cos, sin)


def _rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x rotated by +angle (sign 1) or -angle (sign -1), written into one fp32 buffer."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out.to(x.dtype)


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate_by(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_by(grad, cos, sin, -1.0), None, None  # a rotation's transpose is its inverse


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same state-dict name) with a two-pass backward for fp32 inputs
    outside torch.compile and autocast; other dtypes, compiled code and autocast take nn.RMSNorm's
    own path (autocast would run the statistics' dot products in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and x.dtype != self.weight.dtype:  # autocast: 16-bit q or k, fp32 gain
            return super().forward(x.float()).to(x.dtype)
        if (torch.compiler.is_compiling() or x.dtype != torch.float32 or self.weight is None
                or self.weight.dtype != torch.float32 or self.eps is None
                or torch.is_autocast_enabled(x.device.type)):
            return super().forward(x)
        return _RMSNorm.apply(x, self.weight, self.eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x * rstd
        # d/dx of x * rstd * w: rstd * (g*w - normed * mean(g*w * normed))
        gw = grad * weight
        mean = torch.linalg.vecdot(gw, normed).unsqueeze(-1).div_(x.shape[-1])
        grad_x = gw.addcmul_(normed, mean, value=-1).mul_(rstd)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.linalg.vecdot(grad.reshape(-1, x.shape[-1]), normed.reshape(-1, x.shape[-1]), dim=0)
        return grad_x, grad_w, None
