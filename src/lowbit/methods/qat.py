"""QAT: quantisation-aware training's scheme, as a method config (Jacob et al. 2018; LSQ, Esser et al. 2020).

The values of a QAT weight are chosen by training (lowbit.train.qat: fake quantisation in the forward
pass, the straight-through estimator in the backward pass, learned step sizes), not by a solver, so this
config's own `quantize_weight` is QAT's starting point: round-to-nearest with min-max scales, what the
trainer initialises from. It exists so that a QAT model's recipe names what made it ("qat-int3-g128") and
its weights load, export and evaluate like any post-training model's: same QuantizedTensor, same modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lowbit.core import QuantizedTensor, quantize
from lowbit.methods.base import SchemeMethod, register_method


@register_method
@dataclass(frozen=True)
class QAT(SchemeMethod):
    """scheme: any weight scheme (integer grids per channel or group, NF4/FP4, FP8, MX, NVFP4)."""

    name = "qat"
    granularities = ("tensor", "channel", "group")
    trains: ClassVar[bool] = True       # `lowbit quantize` refuses it: `lowbit qat` trains

    def quantize_weight(self, weight, stats=None) -> QuantizedTensor:
        return quantize(weight, self.scheme, "minmax")
