"""Round-to-nearest: the baseline every other method must beat. Needs no calibration.

Any scheme: integer grids (symmetric or with a zero point, integer or float), code books (NF4, FP4 ...)
and float formats, per tensor, channel or group, with the block ranges chosen by an observer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, QuantSpec, quantize
from lowbit.core.observers import OBSERVERS
from lowbit.errors import LowbitError
from lowbit.methods.base import SchemeMethod, register_method


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, observer: str = "minmax") -> QuantizedTensor:
    return quantize(weight, spec, observer)


@register_method
@dataclass(frozen=True)
class RTN(SchemeMethod):
    """scheme (default int4 g128 symmetric, fp16 scales); observer: minmax, mse or percentile."""

    name = "rtn"
    granularities = ("tensor", "channel", "group")
    words = {"mse": {"observer": "mse"}, "percentile": {"observer": "percentile"}, "minmax": {"observer": "minmax"}}
    observer: str = "minmax"

    def __post_init__(self):
        super().__post_init__()
        if self.observer not in OBSERVERS:
            raise LowbitError(f"observer must be one of {', '.join(sorted(OBSERVERS))}, got {self.observer!r}")

    def quantize_weight(self, weight, stats=None) -> QuantizedTensor:
        return rtn_quantize(weight, self.scheme, self.observer)
