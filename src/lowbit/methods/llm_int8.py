"""LLM.int8() (Dettmers et al., 2022): vector-wise int8 with mixed-precision decomposition.

Weights: int8, one absmax scale per output channel (the rows of W; "columns" in the paper's X W
notation). At run time (lowbit.nn.Int8MixedLinear, holding a MixedInt8Weight) every input feature column in which some |x| reaches
`threshold` (6.0 in the paper and bitsandbytes) is multiplied in floating point; the rest is quantised
per row and multiplied in int8. The module counts the fraction of columns it kept in floating point
(lowbit.nn.w8a8.outlier_fraction); the calibration tokens give a first estimate, recorded per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.methods.base import MethodConfig, register_method
from lowbit.methods.w8a8 import int8_weight
from lowbit.weights import placeholders
from lowbit.weights.int8 import WEIGHT_SPEC, MixedInt8Weight

DEFAULT_THRESHOLD = 6.0


@register_method
@dataclass(frozen=True)
class LLMInt8(MethodConfig):
    """threshold: input columns with some |x| >= threshold run in float; 0 turns the decomposition off."""

    name = "llm-int8"
    required_stats = ("act_absmax",)
    words = {"t": "threshold"}
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise LowbitError(f"the LLM.int8() threshold must be a finite number >= 0, got {self.threshold!r}")

    def quantize_weight(self, weight, stats=None) -> MixedInt8Weight:
        q = int8_weight(weight)
        if stats is not None and stats.n_tokens and self.threshold > 0:
            # a column counts when its calibration absmax reaches the threshold (an upper bound on what a
            # single forward sees: there only the tokens of that call count)
            q.extras["calibration_outlier_fraction"] = float((stats.act_absmax() >= self.threshold).float().mean())
        return MixedInt8Weight(q, self.threshold)

    def planned_weight(self, shape, layer) -> MixedInt8Weight:
        return MixedInt8Weight(placeholders.affine(shape, WEIGHT_SPEC), self.threshold)
