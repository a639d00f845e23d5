"""Round-to-nearest: the baseline every other method must beat. Needs no calibration.

Any scheme: integer grids (symmetric or with a zero point, integer or float), code books (NF4, FP4 ...)
and float formats, per tensor, channel or group, with the block ranges chosen by an observer; the
microscaling schemes (rtn-mxfp4, rtn-nvfp4, ...). With FP8 weights per channel or tensor, "a8dyn" (per-token
dynamic) or "a8static" (per-tensor, calibrated max|x| / 448) also quantises the Linear's input to FP8 E4M3:
W8A8-FP8 ("rtn-fp8_e4m3-channel-a8dyn").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, QuantSpec, quantize
from lowbit.core.observers import OBSERVERS
from lowbit.errors import LowbitError
from lowbit.methods.base import SchemeMethod, register_method
from lowbit.weights import FP8ActWeight, placeholders
from lowbit.weights.fp8 import ACT_MAX, check_fp8_weight


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, observer: str = "minmax") -> QuantizedTensor:
    return quantize(weight, spec, observer)


@register_method
@dataclass(frozen=True)
class RTN(SchemeMethod):
    """scheme (default int4 g128 symmetric, fp16 scales); observer: minmax, mse or percentile."""

    name = "rtn"
    granularities = ("tensor", "channel", "group")
    words = {"mse": {"observer": "mse"}, "percentile": {"observer": "percentile"}, "minmax": {"observer": "minmax"},
             "a8dyn": {"activation": "token"}, "a8static": {"activation": "tensor"}}
    observer: str = "minmax"
    activation: str | None = None       # FP8 activations: "token" (dynamic) or "tensor" (static)

    def __post_init__(self):
        super().__post_init__()
        if self.observer not in OBSERVERS:
            raise LowbitError(f"observer must be one of {', '.join(sorted(OBSERVERS))}, got {self.observer!r}")
        if self.activation is not None:
            check_fp8_weight(placeholders.affine((1, 1), self.scheme))
            if self.activation not in ("token", "tensor"):
                raise LowbitError(f"activation must be 'token', 'tensor' or None, got {self.activation!r}")

    @property
    def required_stats(self) -> tuple[str, ...]:
        return ("act_absmax",) if self.activation == "tensor" else ()

    def quantize_weight(self, weight, stats=None):
        q = rtn_quantize(weight, self.scheme, self.observer)
        if self.activation is None:
            return q
        return FP8ActWeight(q, self.activation, self._input_scale(stats) if self.activation == "tensor" else None)

    def _input_scale(self, stats) -> float:
        if stats is None or stats.n_tokens == 0:
            raise LowbitError(f"{self.short_name()} (static FP8 activations) needs calibration data for its scale")
        amax = float(stats.act_absmax().max())
        return amax / ACT_MAX if amax > 0 else 1.0

    def planned_weight(self, shape, layer):
        q = placeholders.affine(shape, self.scheme)
        return q if self.activation is None else FP8ActWeight(q, self.activation, 1.0)
