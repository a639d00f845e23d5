"""Observers choose the range [lo, hi] of each block that the scale maps onto the grid.

    minmax      the block's extremes: nothing clipped, but one outlier stretches the grid
    percentile  the p-th percentile of |x| (or of x on both sides when asymmetric)
    mse         the clip ratio of the min-max range that minimises the block's squared error
    kl          TensorRT's entropy calibration: the |x| threshold whose quantised histogram is closest
                in KL divergence to the original (symmetric; meant for per-tensor activations)

Each observer maps blocks [rows, blocks per row, block size] to (lo, hi), each [rows, blocks per row].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.core.qparams import fake_quantize_blocks, scale_and_zero
from lowbit.core.spec import QuantSpec
from lowbit.errors import LowbitError


def _symmetric(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = torch.maximum(lo.abs(), hi.abs())
    return -amax, amax


@dataclass(frozen=True)
class MinMax:
    name = "minmax"

    def __call__(self, blocks: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        return _symmetric(lo, hi) if spec.symmetric else (lo, hi)


def _quantile(blocks: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile along the last dim (torch.quantile caps its input size)."""
    s, _ = torch.sort(blocks, dim=-1)
    pos = q * (s.shape[-1] - 1)
    i = int(np.floor(pos))
    j = min(i + 1, s.shape[-1] - 1)
    return s[..., i] + (pos - i) * (s[..., j] - s[..., i])


@dataclass(frozen=True)
class Percentile:
    percentile: float = 99.99
    name = "percentile"

    def __post_init__(self):
        if not 50.0 < self.percentile <= 100.0:
            raise LowbitError(f"percentile must be in (50, 100], got {self.percentile}")

    def __call__(self, blocks: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        if spec.symmetric:
            amax = _quantile(blocks.abs(), q)
            return -amax, amax
        return _quantile(blocks, 1.0 - q), _quantile(blocks, q)


@dataclass(frozen=True)
class MSE:
    """Grid search over ratios r of the min-max range, r from 1 down to 1 - max_shrink."""

    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.0
    name = "mse"

    def __call__(self, blocks: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        lo0, hi0 = MinMax()(blocks, spec)
        best_lo, best_hi = lo0.clone(), hi0.clone()
        best_err = torch.full_like(lo0, torch.inf)
        for ratio in torch.linspace(1.0, 1.0 - self.max_shrink, self.grid).tolist():
            lo, hi = lo0 * ratio, hi0 * ratio
            scale, zero = scale_and_zero(lo, hi, spec)
            err = (fake_quantize_blocks(blocks, scale, zero, spec) - blocks).abs().pow(self.norm).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        return best_lo, best_hi


def kl_threshold_bin(hist: np.ndarray, n_levels: int) -> int:
    """Number of histogram bins to keep (TensorRT entropy calibration) for `n_levels` magnitude levels.

    For each candidate i: P = the first i bins with everything beyond folded into the last; Q = P's
    first i bins merged into n_levels chunks and spread back evenly over the non-empty bins of each
    chunk. The i with the smallest KL(P || Q) wins.
    """
    best_i, best_kl = len(hist), np.inf
    total_beyond = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])
    for i in range(n_levels, len(hist) + 1):
        p = hist[:i].astype(np.float64).copy()
        p[-1] += total_beyond[i]
        chunk = (np.arange(i) * n_levels) // i
        nonzero = (hist[:i] > 0).astype(np.float64)
        chunk_sum = np.bincount(chunk, weights=hist[:i], minlength=n_levels)
        chunk_count = np.bincount(chunk, weights=nonzero, minlength=n_levels)
        q = np.where(nonzero > 0, chunk_sum[chunk] / np.maximum(chunk_count[chunk], 1), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            continue
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


@dataclass(frozen=True)
class KL:
    bins: int = 2048
    name = "kl"

    def __call__(self, blocks: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if not spec.symmetric:
            raise LowbitError("the KL observer is symmetric (it calibrates |x|); use symmetric=True")
        from lowbit.core.qparams import symmetric_capacity

        n_levels = int(symmetric_capacity(spec)) + 1
        if n_levels > self.bins:
            raise LowbitError(f"KL needs more histogram bins ({self.bins}) than levels ({n_levels})")
        flat = blocks.reshape(-1, blocks.shape[-1]).abs().double().numpy()
        amax = np.zeros(flat.shape[0])
        for b, row in enumerate(flat):
            top = row.max()
            if top == 0:
                continue
            hist, edges = np.histogram(row, bins=self.bins, range=(0.0, top))
            amax[b] = edges[kl_threshold_bin(hist, n_levels)]
        amax_t = torch.from_numpy(amax).float().reshape(blocks.shape[:-1])
        return -amax_t, amax_t


OBSERVERS = {"minmax": MinMax, "percentile": Percentile, "mse": MSE, "kl": KL}


def get_observer(observer) -> object:
    """An observer instance from a name ("mse") or an instance (MSE(grid=50))."""
    if isinstance(observer, str):
        if observer not in OBSERVERS:
            raise LowbitError(f"unknown observer {observer!r}; known: {', '.join(OBSERVERS)}")
        return OBSERVERS[observer]()
    if not callable(observer):
        raise LowbitError(f"an observer must be a name or a callable, got {observer!r}")
    return observer
