"""Round-to-nearest: the baseline every other method must beat. Needs no calibration."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, QuantSpec, quantize
from lowbit.errors import LowbitError
from lowbit.methods.base import MethodConfig, int_scheme_name, parse_int_scheme, register_method


def weight_spec(bits: int, group_size: int | None, symmetric: bool, scale_dtype: str = "fp16") -> QuantSpec:
    """The integer scheme of a Linear weight [out, in]: per output channel, or groups along the input."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise LowbitError(f"weight bits must be 2..8, got {bits!r}")
    fmt = f"int{bits}" if symmetric else f"uint{bits}"
    if group_size:
        return QuantSpec(fmt, "group", group_size, symmetric, scale_dtype)
    return QuantSpec(fmt, "channel", None, symmetric, scale_dtype)


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, observer: str = "minmax") -> QuantizedTensor:
    return quantize(weight, spec, observer)


@register_method
@dataclass(frozen=True)
class RTN(MethodConfig):
    name = "rtn"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    observer: str = "minmax"
    scale_dtype: str = "fp16"

    def __post_init__(self):
        self.spec()  # validate early: bad bits or group size fail at construction

    def spec(self) -> QuantSpec:
        return weight_spec(self.bits, self.group_size, self.symmetric, self.scale_dtype)

    def quantize_weight(self, weight, stats=None) -> QuantizedTensor:
        return rtn_quantize(weight, self.spec(), self.observer)

    def short_name(self) -> str:
        return "rtn-" + int_scheme_name(self.bits, self.group_size, self.symmetric) + (
            "" if self.observer == "minmax" else f"-{self.observer}")

    @classmethod
    def from_short_name(cls, rest):
        observers = [w for w in rest if w in ("mse", "percentile", "minmax")]
        kwargs = parse_int_scheme([w for w in rest if w not in observers])
        kwargs.setdefault("group_size", None)  # "rtn-int8" means per-channel
        if observers:
            kwargs["observer"] = observers[0]
        return cls(**kwargs)
