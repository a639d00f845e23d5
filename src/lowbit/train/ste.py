"""The straight-through estimator (Bengio et al. 2013) and fake quantisation with it.

Fake quantisation rounds a tensor to a quantisation grid in the forward pass and lets the gradient through
in the backward pass as if rounding were the identity. `fake_quant_affine` is the clipped version used by
QAT: the gradient is exactly 1 where x lies inside the representable range and exactly 0 outside it, and
the step size gets LSQ's gradient (Esser et al. 2020, "Learned Step Size Quantization", eq. 3), so scales
can be learned beside the weights.
"""
from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass (half to even, as torch.round), identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


class _FakeQuantAffine(torch.autograd.Function):
    """x_hat = (clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale, with explicit gradients so that
    the STE's mask is exact (autograd through x / s * s would give 1 only up to rounding)."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin: float, qmax: float, grad_factor: float, rounder):
        v = x / scale + zero
        q = torch.clamp(torch.round(v), qmin, qmax) if rounder is None else rounder(v)
        ctx.save_for_backward(v, q, scale, zero)
        ctx.qmin, ctx.qmax, ctx.grad_factor = qmin, qmax, grad_factor
        return (q - zero) * scale

    @staticmethod
    def backward(ctx, g):
        v, q, scale, zero = ctx.saved_tensors
        inside = (v >= ctx.qmin) & (v <= ctx.qmax)
        grad_x = g * inside if ctx.needs_input_grad[0] else None
        grad_scale = grad_zero = None
        if ctx.needs_input_grad[1]:
            # LSQ: d x_hat / d s = round(v) - v inside the range, the clamped level minus the zero outside it
            ds = torch.where(inside, q - v, q - zero)
            grad_scale = (g * ds * ctx.grad_factor).sum_to_size(scale.shape)
        if ctx.needs_input_grad[2]:
            # LSQ+: the zero point moves x_hat only where x is clipped
            grad_zero = torch.where(inside, torch.zeros_like(g), -g * scale).sum_to_size(zero.shape)
        return grad_x, grad_scale, grad_zero, None, None, None, None


def fake_quant_affine(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, qmin: float, qmax: float,
                      grad_factor: float = 1.0, rounder=None) -> torch.Tensor:
    """Quantise-dequantise `x` on the integer grid [qmin, qmax] with `scale` and `zero` (broadcast against x:
    per tensor, per channel [out, 1] or per group [out, groups, 1] over x viewed as [out, groups, size]).

    Backward: dx = dy where qmin <= x/scale + zero <= qmax, else 0 (the clipped STE); dscale by LSQ, times
    `grad_factor` (LSQ recommends 1 / sqrt(elements per scale * qmax)); dzero = -scale * dy where clipped.
    rounder: a saturating grid rounding of v = x / scale + zero onto levels in [qmin, qmax] (a format's
    `round`, e.g. NF4's or FP8's levels); default the integers.
    """
    zero = torch.as_tensor(zero, dtype=x.dtype, device=x.device)
    return _FakeQuantAffine.apply(x, scale, zero, float(qmin), float(qmax), float(grad_factor), rounder)


def fake_quant_grid(x: torch.Tensor, rounder) -> torch.Tensor:
    """x rounded by `rounder` (any tensor -> nearest representable value, e.g. an FP8 or NF4 grid) in the
    forward pass, the identity gradient in the backward pass (values past the grid's ends saturate in the
    forward pass; their gradient is masked by the caller's clamp, if any)."""
    return x + (rounder(x.detach()) - x).detach()


__all__ = ["round_ste", "fake_quant_affine", "fake_quant_grid"]
