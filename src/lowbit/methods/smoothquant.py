"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights, then W8A8.

For each group of Linears reading the same input X, per input channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)       (W_j: column j of every Linear in the group)

X / s has its outlier channels shrunk, W diag(s) takes them on; the division is folded into the op that
produces X (a norm, or v_proj / up_proj for o_proj / down_proj), so the full-precision model computes
the same function (the pipeline folds what `input_scales` returns: methods/scaling.py). alpha = 0.5 balances the two; `alpha=None` ("smoothquant-search")
picks it per group from a grid, by the group's W8A8 output error on calibration rows. Then every
Linear is quantised as W8A8 (methods/w8a8.py), per-token dynamic by default or per-tensor static.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.int8 import quantize_rows
from lowbit.methods.base import register_method
from lowbit.methods.scaling import InputScaling, ScaleContext
from lowbit.methods.w8a8 import ACTIVATION_WORDS, W8A8, int8_weight

ALPHA_GRID = tuple(i / 20 for i in range(21))
MIN_SCALE = 1e-5       # SmoothQuant's clamp on s (and on max|W_j|)


def weight_column_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max |W_ij| over the rows of every Linear in the group, per input column j."""
    return torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 where a channel never fired or has no weight."""
    x = x_absmax.double()
    w = w_absmax.double().clamp(min=MIN_SCALE)
    s = (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=MIN_SCALE)
    return torch.where((x > 0) & (w_absmax.double() > 0), s, torch.ones_like(s))


def fake_w8a8(x: torch.Tensor, w: torch.Tensor, activation: str, static_absmax: float | None) -> torch.Tensor:
    """x W^T with both operands rounded through int8 as W8A8Linear rounds them (in float, for searching)."""
    if activation == "token":
        codes, scale = quantize_rows(x)
        xq = codes.float() * scale[:, None]
    else:
        step = static_absmax / 127 if static_absmax > 0 else 1.0
        xq = torch.clamp(torch.round(x / step), -128, 127) * step
    return xq @ int8_weight(w).dequantize().T


def sample_rows(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """At most n rows of x, a seeded random choice (all of them when there are fewer)."""
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]


@torch.no_grad()
def smoothed_error(rows: torch.Tensor, weights: list[torch.Tensor], s_cols: torch.Tensor, activation: str,
                   x_absmax_cols: torch.Tensor) -> float:
    """Relative W8A8 output error of the group when its input is divided by s_cols."""
    xs = rows / s_cols.float()
    static = float((x_absmax_cols / s_cols).max()) if activation == "tensor" else None
    num = den = 0.0
    for w in weights:
        w = w.detach().float()
        ref = rows @ w.T
        num += float((fake_w8a8(xs, w * s_cols.float(), activation, static) - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / den if den > 0 else 0.0


@torch.no_grad()
def search_alpha(rows: torch.Tensor, ctx: ScaleContext, x_absmax_cols: torch.Tensor, activation: str,
                 grid=ALPHA_GRID) -> tuple[float, float]:
    """(alpha, error) with the smallest W8A8 output error over the grid."""
    x_max = ctx.reduce(x_absmax_cols, "max")
    w_max = ctx.reduce(weight_column_absmax(ctx.weights), "max")
    best = (math.inf, 0.5)
    for alpha in grid:
        s_cols = ctx.expand(smoothing_scales(x_max, w_max, alpha))
        err = smoothed_error(rows, ctx.weights, s_cols, activation, x_absmax_cols)
        if err < best[0]:
            best = (err, alpha)
    return best[1], best[0]


@register_method
@dataclass(frozen=True)
class SmoothQuant(InputScaling, W8A8):
    """alpha: migration strength in [0, 1], or None to search it per group; activation: "token" (dynamic)
    or "tensor" (static); search_rows: calibration rows per group the alpha search uses."""

    name = "smoothquant"
    words = {"search": {"alpha": None}, "a": "alpha", **ACTIVATION_WORDS}
    alpha: float | None = 0.5
    search_rows: int = 2048

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise LowbitError(f"SmoothQuant alpha must be in [0, 1] (or None to search), got {self.alpha!r}")

    @property
    def keeps_inputs(self) -> bool:
        return self.alpha is None

    def input_scales(self, ctx: ScaleContext) -> torch.Tensor:
        """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) of one group, alpha given or searched."""
        x_absmax = ctx.stats.act_absmax()
        alpha = self.alpha
        if alpha is None:
            rows = sample_rows(ctx.stats.input_matrix(), self.search_rows, ctx.seed)
            alpha, _ = search_alpha(rows, ctx, x_absmax, self.activation)
        return smoothing_scales(ctx.reduce(x_absmax, "max"), ctx.reduce(weight_column_absmax(ctx.weights), "max"),
                                alpha)
