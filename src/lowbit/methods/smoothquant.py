"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights, then W8A8.

For each group of Linears reading the same input X, per input channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)       (W_j: column j of every Linear in the group)

X / s has its outlier channels shrunk, W diag(s) takes them on; the division is folded into the op that
produces X (a norm, or v_proj / up_proj for o_proj / down_proj), so the full-precision model computes
the same function (pipeline/fold.py). alpha = 0.5 balances the two; `alpha=None` ("smoothquant-search")
picks it per group from a grid, by the group's W8A8 output error on calibration rows. Then every
Linear is quantised as W8A8 (methods/w8a8.py), per-token dynamic by default or per-tensor static.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.int8 import quantize_rows
from lowbit.methods.base import register_method
from lowbit.methods.w8a8 import ACTIVATION_WORDS, W8A8, int8_weight
from lowbit.pipeline.fold import (InputSource, block_linears, fold_scales, foldable_groups, group_input_stats,
                                  sample_rows)

ALPHA_GRID = tuple(i / 20 for i in range(21))
MIN_SCALE = 1e-5       # SmoothQuant's clamp on s (and on max|W_j|)


def weight_column_absmax(linears: list[nn.Linear]) -> torch.Tensor:
    """max |W_ij| over the rows of every Linear in the group, per input column j."""
    return torch.stack([m.weight.detach().float().abs().amax(0) for m in linears]).amax(0)


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


@torch.no_grad()
def smoothed_error(rows: torch.Tensor, linears: list[nn.Linear], s_cols: torch.Tensor, activation: str,
                   x_absmax_cols: torch.Tensor) -> float:
    """Relative W8A8 output error of the group when its input is divided by s_cols."""
    xs = rows / s_cols.float()
    static = float((x_absmax_cols / s_cols).max()) if activation == "tensor" else None
    num = den = 0.0
    for m in linears:
        w = m.weight.detach().float()
        ref = rows @ w.T
        num += float((fake_w8a8(xs, w * s_cols.float(), activation, static) - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / den if den > 0 else 0.0


@torch.no_grad()
def search_alpha(rows: torch.Tensor, linears: list[nn.Linear], source: InputSource, x_absmax_cols: torch.Tensor,
                 activation: str, grid=ALPHA_GRID) -> tuple[float, float]:
    """(alpha, error) with the smallest W8A8 output error over the grid."""
    x_max = source.reduce(x_absmax_cols, "max")
    w_max = source.reduce(weight_column_absmax(linears), "max")
    best = (math.inf, 0.5)
    for alpha in grid:
        s_cols = source.expand(smoothing_scales(x_max, w_max, alpha))
        err = smoothed_error(rows, linears, s_cols, activation, x_absmax_cols)
        if err < best[0]:
            best = (err, alpha)
    return best[1], best[0]


@register_method
@dataclass(frozen=True)
class SmoothQuant(W8A8):
    """alpha: migration strength in [0, 1], or None to search it per group; activation: "token" (dynamic)
    or "tensor" (static); search_rows: calibration rows per group the alpha search uses."""

    name = "smoothquant"
    alpha: float | None = 0.5
    search_rows: int = 2048

    def __post_init__(self):
        super().__post_init__()
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise LowbitError(f"SmoothQuant alpha must be in [0, 1] (or None to search), got {self.alpha!r}")

    def prepare_block(self, block, arch, inputs, run_block, block_index=0) -> None:
        """Smooth every group of the block whose input comes from a norm or a foldable Linear."""
        linears = block_linears(block)
        groups = foldable_groups(block, arch, list(linears))
        if not groups or not inputs:
            return
        stats = group_input_stats(block, inputs, groups, linears, keep_inputs=self.alpha is None)
        for group, source in groups:
            st = stats[group[0]]
            if st.n_tokens == 0:
                continue
            mods = [linears[n] for n in group]
            x_absmax = st.act_absmax()
            alpha = self.alpha
            if alpha is None:
                rows = sample_rows(st.input_matrix(), self.search_rows, block_index)
                alpha, _ = search_alpha(rows, mods, source, x_absmax, self.activation)
            s = smoothing_scales(source.reduce(x_absmax, "max"), source.reduce(weight_column_absmax(mods), "max"),
                                 alpha)
            fold_scales(source, mods, s)

    def short_name(self) -> str:
        words = [self.name]
        if self.alpha is None:
            words.append("search")
        elif self.alpha != 0.5:
            words.append(f"a{self.alpha:g}")
        if self.activation == "tensor":
            words.append("static")
        return "-".join(words)

    @classmethod
    def from_short_name(cls, rest):
        kwargs: dict = {}
        for w in rest:
            if w in ACTIVATION_WORDS:
                kwargs["activation"] = ACTIVATION_WORDS[w]
            elif w == "search":
                kwargs["alpha"] = None
            elif w.startswith("a"):
                try:
                    kwargs["alpha"] = float(w[1:])
                except ValueError:
                    raise LowbitError(f"unrecognised word {w!r} in smoothquant method name (expected aN, e.g. "
                                      "a0.8, search, static or dynamic)") from None
            else:
                raise LowbitError(f"unrecognised word {w!r} in smoothquant method name (expected aN, e.g. a0.8, "
                                  "search, static or dynamic)")
        return cls(**kwargs)
