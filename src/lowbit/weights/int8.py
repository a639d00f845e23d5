"""int8 weights whose Linear also quantises its input: W8A8 and LLM.int8()'s mixed decomposition.

Both hold the weight as a symmetric int8 QuantizedTensor, one float32 scale per output row (WEIGHT_SPEC),
and say how the module treats activations: W8A8 quantises every input row to int8 (per token, dynamic)
or with one calibrated per-tensor scale (static); LLM.int8() (Dettmers et al., 2022) keeps the input
columns that reach `threshold` in floating point. nn/w8a8.py runs them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, QuantSpec
from lowbit.errors import LowbitError

WEIGHT_SPEC = QuantSpec("int8", "channel", None, True, "fp32")
ACTIVATIONS = ("token", "tensor")


def check_int8_weight(q: QuantizedTensor) -> QuantizedTensor:
    spec = q.spec
    if spec.format != "int8" or spec.granularity != "channel" or not spec.symmetric:
        raise LowbitError(f"an int8 Linear takes int8 symmetric per-channel weights, got {spec.format} "
                          f"{spec.granularity}{'' if spec.symmetric else ' asymmetric'}")
    return q


def check_activation_quant(activation: str, input_scale: float | None) -> None:
    """"token" (dynamic) or "tensor" with a positive calibrated input scale, else a one-line error."""
    if activation not in ACTIVATIONS:
        raise LowbitError(f"activation quantisation must be 'token' (per-token dynamic) or 'tensor' "
                          f"(per-tensor static), got {activation!r}")
    if activation == "tensor" and not (input_scale is not None and float(input_scale) > 0):
        raise LowbitError("static (per-tensor) activation quantisation needs a positive calibrated input scale")


class _Int8Weight:
    """Size, values and extras are the int8 weight's: activations are quantised at run time, not stored."""

    weight: QuantizedTensor

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def extras(self) -> dict:
        return self.weight.extras

    @property
    def numel(self) -> int:
        return self.weight.numel

    @property
    def storage_bits(self) -> int:
        return self.weight.storage_bits

    @property
    def bits_per_element(self) -> float:
        return self.weight.bits_per_element

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def dequantize(self) -> torch.Tensor:
        return self.weight.dequantize()


@dataclass
class ActQuantWeight(_Int8Weight):
    """W8A8: activation "token" (each row's absmax / 127 at run time) or "tensor" (input_scale, one
    static scale calibrated as max|x| / 127)."""

    weight: QuantizedTensor
    activation: str = "token"
    input_scale: float | None = None

    def __post_init__(self):
        check_int8_weight(self.weight)
        check_activation_quant(self.activation, self.input_scale)


@dataclass
class MixedInt8Weight(_Int8Weight):
    """LLM.int8(): input columns with some |x| >= threshold are multiplied in floating point (0: none)."""

    weight: QuantizedTensor
    threshold: float = 6.0

    def __post_init__(self):
        check_int8_weight(self.weight)
        if not self.threshold >= 0:
            raise LowbitError(f"the outlier threshold must be >= 0 (0: no decomposition), got {self.threshold!r}")
