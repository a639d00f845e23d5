"""FP8 weights whose Linear also quantises its input to FP8 (W8A8-FP8, as vLLM's compressed-tensors
FP8 schemes define it): weights E4M3 (or E5M2) per output channel or per tensor with float32 scales,
activations E4M3 per token (dynamic: each row's absmax / 448 at run time) or per tensor (static: one
scale calibrated as max|x| / 448). nn/fp8.py runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor
from lowbit.errors import LowbitError
from lowbit.weights.int8 import _Int8Weight, check_activation_quant

FP8_FORMATS = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ACT_FORMAT = "fp8_e4m3"
ACT_MAX = 448.0


def check_fp8_weight(q: QuantizedTensor) -> QuantizedTensor:
    spec = q.spec
    if spec.format not in FP8_FORMATS or spec.granularity not in ("channel", "tensor") or q.g_idx is not None:
        raise LowbitError(f"FP8 activations go with FP8 weights per channel or per tensor, got {spec.format} "
                          f"per {spec.granularity}")
    return q


@dataclass
class FP8ActWeight(_Int8Weight):
    """W8A8-FP8: an FP8 weight and activations quantised to E4M3, per "token" (dynamic) or per "tensor"
    (input_scale, static). Size and values are the weight's; activations are quantised at run time."""

    weight: QuantizedTensor
    activation: str = "token"
    input_scale: float | None = None

    def __post_init__(self):
        check_fp8_weight(self.weight)
        check_activation_quant(self.activation, self.input_scale)
