"""Output-aware clipping of GPTQ's static group ranges (the clipping search AWQ runs, on GPTQ's grid).

Each output row's group of `size` columns gets the range of its weights shrunk by a ratio r in 1,
1 - 1/n_grid, ... > 1 - max_shrink, the one that minimises the group's own output error
d^T H_gg d, d = w - Q_r(w), H_gg the group's diagonal block of the Hessian (2/n X^T X): exact over every
calibration token, where a weight-space search (`mse`) treats every input channel alike. GPTQ then keeps
these ranges as its static scales and feeds the rounding (and clipping) error forward as usual.
"""
from __future__ import annotations

import math

import torch

from lowbit.core import QuantSpec, fake_quantize_blocks, scale_and_zero
from lowbit.core.qparams import symmetric_capacity

CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5     # AWQ's (AutoAWQ's) clipping grid


def block_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, full_grid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The range handed to scale_and_zero for a block with extremes lo, hi: symmetric grids use the
    absmax, shrunk by c / (c + 1/2) on the full grid (see methods/gptq.py, `full_grid`)."""
    if not spec.symmetric:
        return lo, hi
    amax = torch.maximum(lo.abs(), hi.abs())
    if full_grid and spec.number_format.is_integer:
        cap = symmetric_capacity(spec)
        amax = amax * (cap / (cap + 0.5))
    return -amax, amax


def hessian_clip_params(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, group: int, full_grid: bool,
                        n_grid: int = CLIP_GRID, max_shrink: float = CLIP_MAX_SHRINK, gs=None):
    """(scale, zero), each [n_groups, out], of the contiguous column groups of w [out, in], each group's
    range clipped to the ratio with the least output error through H [in, in]'s diagonal block. gs: the
    weight's global scale (NVFP4), None otherwise."""
    n_out, n_in = w.shape
    n_groups = n_in // group
    blocks = w.float().reshape(n_out, n_groups, group).transpose(0, 1)                  # [g, out, size]
    gram = torch.stack([hessian[g * group:(g + 1) * group, g * group:(g + 1) * group]
                        for g in range(n_groups)]).double()                             # [g, size, size]
    lo0, hi0 = blocks.amin(-1), blocks.amax(-1)
    best_err = torch.full((n_groups, n_out), math.inf, dtype=torch.float64)
    best_scale, best_zero = scale_and_zero(*block_range(lo0, hi0, spec, full_grid), spec, gs)
    for i in range(max(1, int(round(max_shrink * n_grid)))):
        ratio = 1.0 - i / n_grid
        scale, zero = scale_and_zero(*block_range(lo0 * ratio, hi0 * ratio, spec, full_grid), spec, gs)
        d = (blocks - fake_quantize_blocks(blocks, scale, zero, spec)).double()
        err = (torch.bmm(d, gram) * d).sum(-1)                                           # [g, out]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
