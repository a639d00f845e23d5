"""Methods that rescale input channels before quantising (AWQ, SmoothQuant): what they are given.

A group of Linears that read the same input x can take x / s if their weights take W diag(s); the
pipeline folds 1/s into the op producing x (pipeline/fold.py). Such a method only *chooses* s:
`input_scales(ctx)` is a function of the statistics in a ScaleContext, and returns s in the producer's
channels (or None to leave the group alone). It never sees the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lowbit.methods.stats import LayerStats


@dataclass
class ScaleContext:
    """One group of Linears sharing an input, as a scale search sees it.

    weights:     the group's weights [out_i, in], full precision, as held now
    stats:       statistics of the shared input over the search batches (Gram matrix, |x| mean and max;
                 the rows themselves when the method asked for them)
    index:       int64 [in]: the producer channel of each input column (grouped-query attention repeats
                 a v_proj channel over several o_proj columns); None when they are the same
    width:       number of producer channels
    producer:    "norm" or "linear": what the scale will be folded into
    block_error: error of the block's output (or of the submodule `error_scope` names) over the search
                 batches with the group's weights replaced by the given ones (the full-precision output
                 is the target); None if unavailable
    seed:        for any sampling the search does
    """

    weights: list[torch.Tensor]
    stats: LayerStats
    index: torch.Tensor | None
    width: int
    producer: str
    block_error: Callable[[list[torch.Tensor]], float] | None = None
    seed: int = 0

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """A producer-space vector as the group's input columns see it."""
        return s if self.index is None else s[self.index]

    def reduce(self, per_column: torch.Tensor, how: str = "max") -> torch.Tensor:
        """A statistic of the input columns, pooled onto the producer's channels ("max" or "mean")."""
        if self.index is None:
            return per_column
        out = torch.zeros(self.width, dtype=per_column.dtype)
        reduce = {"max": "amax", "mean": "mean"}[how]
        return out.scatter_reduce(0, self.index, per_column, reduce=reduce, include_self=False)


class InputScaling:
    """Mixin of the methods that choose input scales. The pipeline gathers `scale_stats` of each group's
    input over the first `search_batches` calibration batches (None: all), offers the block's output
    error when `uses_block_error`, calls `input_scales` and folds the result, whichever Linears of the
    recipe the method is configured for (default or override)."""

    @property
    def keeps_inputs(self) -> bool:
        """Whether the search needs the input rows themselves (ctx.stats.input_matrix())."""
        return False

    @property
    def uses_block_error(self) -> bool:
        return False

    @property
    def error_scope(self) -> str:
        """Whose output `block_error` judges: "block" (the block's) or "module" (the smallest submodule
        holding the group, pipeline/scaling.py error_scope)."""
        return "block"

    @property
    def scale_search_batches(self) -> int | None:
        return None

    def input_scales(self, ctx: ScaleContext) -> torch.Tensor | None:
        raise NotImplementedError
