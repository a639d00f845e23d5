"""Weights that ggml quantisers get wrong, and gguf-py's own dequantiser, shared by the ggml tests."""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants


def awkward_weights(rows=24, cols=512, seed=0) -> torch.Tensor:
    """Gaussian rows plus the cases quantisers get wrong: outliers, zeros, constants, one sign, tiny."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[1, 5] = 0.9                    # one outlier
    w[2] = 0                         # all zero
    w[3] = 0.013                     # constant positive
    w[4] = -w[4].abs()               # all negative
    w[5] *= 1e-6                     # tiny
    w[6, :32] = 0                    # one zero 32-block inside a live super-block
    return w


def extreme_weights(cols=512, seed=0) -> torch.Tensor:
    """More rows on the edges: large (and fp16-overflowing) values, rounding ties, sparse blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(8, cols)
    w[0] = torch.randn(cols, generator=g) * 300.0                     # large, fp16 still fits
    w[1] = torch.randn(cols, generator=g) * 1e6                       # fp16 overflow of the scales
    w[2] = (torch.arange(cols) % 16 - 8) * 0.125                       # exact ties in every rounding
    w[3] = torch.where(torch.arange(cols) % 2 == 0, 0.01, -0.01)     # alternating signs
    w[4, ::32] = torch.randn(cols // 32, generator=g)                 # one live weight per 32-block
    w[5] = torch.randn(cols, generator=g).abs() * 0.02 + 0.5          # all positive, far from zero
    w[6] = torch.randn(cols, generator=g) * 1e-30                     # below fp16's smallest subnormal
    w[7] = torch.randn(cols, generator=g) * 0.02
    w[7, 100] = -40.0                                                 # one negative outlier
    return w


def importance(cols=512, seed=4) -> torch.Tensor:
    """An imatrix with a wide range and exact zeros (columns no calibration token touched)."""
    imp = torch.rand(cols, generator=torch.Generator().manual_seed(seed)) ** 3
    imp[::7] = 0
    return imp


def gguf_values(data: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[name]))
