"""Statistics of a Linear's inputs, gathered over calibration tokens by the pipeline.

Methods declare which they need (`required_stats`); the pipeline fills them without knowing the method.
The input Gram matrix X^T X is always kept: it gives each layer's output error exactly,
||X (W - Q)^T||^2 = tr((W - Q) X^T X (W - Q)^T), for the per-layer report.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

STAT_NAMES = ("hessian", "act_absmean", "act_absmax", "inputs")


@dataclass
class LayerStats:
    in_features: int
    n_tokens: int = 0
    xtx: torch.Tensor | None = None          # sum of x^T x, float64 [in, in]
    abs_sum: torch.Tensor | None = None      # sum of |x| per input channel
    abs_max: torch.Tensor | None = None      # max of |x| per input channel
    inputs: list = field(default_factory=list)  # raw input rows, only when a method asks ("inputs")
    keep_inputs: bool = False

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.xtx is None:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
            self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)
            self.abs_max = torch.zeros(self.in_features)
        x64 = x.double()
        self.xtx += x64.T @ x64
        self.abs_sum += x64.abs().sum(0)
        self.abs_max = torch.maximum(self.abs_max, x.abs().amax(0))
        self.n_tokens += x.shape[0]
        if self.keep_inputs:
            self.inputs.append(x)

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2/n X^T X (float32)."""
        return (2.0 / max(self.n_tokens, 1) * self.xtx).float()

    def act_absmean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n_tokens, 1)).float()

    def act_absmax(self) -> torch.Tensor:
        return self.abs_max.clone()

    def input_matrix(self) -> torch.Tensor:
        return torch.cat(self.inputs) if self.inputs else torch.empty(0, self.in_features)

    @property
    def dead_inputs(self) -> int:
        """Input channels that never carried a non-zero value."""
        return 0 if self.xtx is None else int((torch.diagonal(self.xtx) == 0).sum())

    def output_error(self, weight: torch.Tensor, approx: torch.Tensor) -> float:
        """Relative output error ||X(W-Q)^T||_F / ||X W^T||_F on the calibration inputs."""
        if self.xtx is None:
            return float("nan")
        d = (weight - approx).double()
        w = weight.double()
        num = torch.einsum("oi,ij,oj->", d, self.xtx, d)
        den = torch.einsum("oi,ij,oj->", w, self.xtx, w)
        return float(torch.sqrt(torch.clamp(num, min=0) / den)) if den > 0 else float("nan")
