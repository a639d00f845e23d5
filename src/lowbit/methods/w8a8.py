"""W8A8: int8 weights (symmetric, one scale per output channel) and int8 activations, multiplied with
int32 accumulation (lowbit.nn.W8A8Linear). Activations are quantised per token at run time ("w8a8",
dynamic) or with one per-tensor scale calibrated as max|x| / 127 over the calibration tokens
("w8a8-static"); a static scale is cheaper to serve but one outlier channel sets it for every token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, quantize
from lowbit.errors import LowbitError
from lowbit.methods.base import MethodConfig, register_method
from lowbit.methods.stats import LayerStats
from lowbit.weights import placeholders
from lowbit.weights.int8 import ACTIVATIONS, WEIGHT_SPEC, ActQuantWeight

ACTIVATION_WORDS = {"static": {"activation": "tensor"}, "dynamic": {"activation": "token"}}


def int8_weight(weight: torch.Tensor) -> QuantizedTensor:
    """Symmetric int8 per output channel with float32 scales: absmax / 127 per row."""
    return quantize(weight, WEIGHT_SPEC, "minmax")


def static_input_scale(stats: LayerStats | None, method: str) -> float:
    """max|x| / 127 over the calibration tokens this layer saw."""
    if stats is None or stats.n_tokens == 0:
        raise LowbitError(f"{method} (static per-tensor activations) needs calibration data to set its scales")
    amax = float(stats.act_absmax().max())
    return amax / 127 if amax > 0 else 1.0


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise LowbitError(f"activation quantisation must be 'token' (per-token dynamic) or 'tensor' "
                          f"(per-tensor static), got {activation!r}")


@register_method
@dataclass(frozen=True)
class W8A8(MethodConfig):
    """activation: "token" (per-token dynamic scales) or "tensor" (one static scale, calibrated)."""

    name = "w8a8"
    required_stats = ("act_absmax",)
    words = ACTIVATION_WORDS
    activation: str = "token"

    def __post_init__(self):
        check_activation(self.activation)

    def quantize_weight(self, weight, stats=None) -> ActQuantWeight:
        scale = static_input_scale(stats, self.short_name()) if self.activation == "tensor" else None
        return ActQuantWeight(int8_weight(weight), self.activation, scale)

    def planned_weight(self, shape, layer) -> ActQuantWeight:
        return ActQuantWeight(placeholders.affine(shape, WEIGHT_SPEC), self.activation,
                              1.0 if self.activation == "tensor" else None)
