"""Delayed scaling for FP8 training: per-tensor scales from a history of past absolute maxima.

The recipe of NVIDIA Transformer Engine (`transformer_engine.common.recipe.DelayedScaling`, "HYBRID"
format) and of Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (arXiv:2209.05433): activations
and weights are cast to E4M3 in the forward pass, gradients to E5M2 in the backward pass, each tensor with
one float32 scale. The scale used at step t comes from the amaxes (max |x|) of the previous steps, not the
current one, so the cast never waits for a reduction over the tensor it casts:

    fp8  = saturate(round(x * scale))            x ~= fp8 / scale
    scale_{t+1} = fp8_max / amax / 2**margin      amax = max(history)        ("max")
                                                  amax = history's newest    ("most_recent")

As in TE's `_default_sf_compute`, the previous scale is kept when that amax is 0 (no history yet, or an
all-zero tensor) or not finite; the initial scale is 1.0, so the first step casts x itself (TE does the
same: its first iteration runs with scale 1 and only records amaxes). The history holds the last
`amax_history_len` amaxes; after every update the window moves on by one (TE's roll).

One deviation from TE, stated: a non-finite amax (inf/NaN gradients of a step the loss scaler skips) is
recorded as 0 rather than as inf, so one skipped step does not freeze the scale for a whole history length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats import get_format

FORWARD_FORMAT, BACKWARD_FORMAT = "fp8_e4m3", "fp8_e5m2"   # TE's Format.HYBRID
AMAX_ALGOS = ("max", "most_recent")


@dataclass(frozen=True)
class DelayedScaling:
    """margin: scales are divided by 2**margin (headroom, >= 0); amax_history_len: amaxes remembered per
    tensor (>= 1; TE's default is 1024, its examples use 16, as lowbit does for short runs);
    amax_compute_algo: "max" over the history or its "most_recent" entry. Raises LowbitError otherwise."""
    margin: int = 0
    amax_history_len: int = 16
    amax_compute_algo: str = "max"

    def __post_init__(self):
        if not isinstance(self.amax_history_len, int) or self.amax_history_len < 1:
            raise LowbitError(f"the amax history length must be an integer >= 1, got {self.amax_history_len!r}")
        if not isinstance(self.margin, int) or self.margin < 0:
            raise LowbitError(f"the FP8 scaling margin must be an integer >= 0, got {self.margin!r}")
        if self.amax_compute_algo not in AMAX_ALGOS:
            raise LowbitError(f"unknown amax algorithm {self.amax_compute_algo!r}; known: {', '.join(AMAX_ALGOS)}")


def fp8_max(name: str) -> float:
    """Largest finite value of the FP8 format `name`: 448 for E4M3FN, 57344 for E5M2."""
    return get_format(name).max_value


def scale_from_history(history: torch.Tensor, scale: torch.Tensor, top: float, recipe: DelayedScaling) -> torch.Tensor:
    """New scales [C] from histories [L, C] (row 0 the newest) and current scales [C]: TE's
    `_default_sf_compute`, keeping the old scale where the amax is 0 or not finite."""
    amax = history.amax(0) if recipe.amax_compute_algo == "max" else history[0]
    new = top / amax / 2.0 ** recipe.margin
    keep = (amax <= 0) | ~torch.isfinite(amax)
    return torch.where(keep, scale, new)


@torch.no_grad()
def record_amax(history: torch.Tensor, scale: torch.Tensor, column: int, x: torch.Tensor, top: float,
                recipe: DelayedScaling) -> None:
    """Record max|x| as the newest amax of column `column` of `history` [L, C], update `scale` [C] from
    it, then move that column's window on by one (the oldest amax is dropped): in place."""
    amax = x.detach().abs().amax().float() if x.numel() else history.new_zeros(())
    history[0, column] = torch.where(torch.isfinite(amax), amax, 0.0)
    scale[column] = scale_from_history(history[:, column:column + 1], scale[column:column + 1], top, recipe)[0]
    history[:, column] = torch.roll(history[:, column], 1)   # newest -> row 1; the oldest wraps to row 0 ...
    history[0, column] = 0.0                                  # ... and is cleared for the next step
