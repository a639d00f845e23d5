"""Statistics of a Linear's inputs, gathered over calibration tokens by the pipeline.

Methods declare which they need (`required_stats`); the pipeline fills them without knowing the method.
The input Gram matrix X^T X is always kept: it gives each layer's output error exactly,
||X (W - Q)^T||^2 = tr((W - Q) X^T X (W - Q)^T), for the per-layer report.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

STAT_NAMES = ("hessian", "act_absmean", "act_absmax", "inputs")


@dataclass
class StatsUpdate:
    """What one call of a Linear on inputs x [tokens, in] adds to its LayerStats: xtx = x^T x and
    abs_sum = sum|x| over tokens (float64), abs_max = max|x| (float32), the token count, and the rows
    themselves (float32 [tokens, in]; empty [0, in] unless kept). Computed where x is (a rank that owns the
    batch) and added in the run's batch order, so the sums are the same wherever it was computed."""

    xtx: torch.Tensor
    abs_sum: torch.Tensor
    abs_max: torch.Tensor
    n_tokens: int
    rows: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, keep_rows: bool = False) -> "StatsUpdate":
        x = x.detach().reshape(-1, x.shape[-1]).float()
        x64 = x.double()
        return cls(x64.T @ x64, x64.abs().sum(0), x.abs().amax(0), x.shape[0], x if keep_rows else x[:0])

    def tensors(self) -> list[torch.Tensor]:
        """The update as tensors (to send to other processes); `from_tensors` inverts it."""
        return [self.xtx, self.abs_sum, self.abs_max, torch.tensor([self.n_tokens]), self.rows]

    @classmethod
    def from_tensors(cls, tensors) -> "StatsUpdate":
        """The update whose `tensors()` come next from the iterator `tensors`."""
        xtx, abs_sum, abs_max, n, rows = (next(tensors) for _ in fields(cls))
        return cls(xtx, abs_sum, abs_max, int(n[0]), rows)


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
        """Add the inputs x [..., in] of one call."""
        self.add(StatsUpdate.of(x, self.keep_inputs))

    def add(self, u: StatsUpdate) -> None:
        """Add one call's update; updates added in the same order give the same bits."""
        if self.xtx is None:
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
            self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)
            self.abs_max = torch.zeros(self.in_features)
        self.xtx += u.xtx
        self.abs_sum += u.abs_sum
        self.abs_max = torch.maximum(self.abs_max, u.abs_max)
        self.n_tokens += u.n_tokens
        if self.keep_inputs:
            self.inputs.append(u.rows)

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
