"""Round-to-nearest: the baseline every other method must beat. Needs no calibration.

Any scheme: integer grids (symmetric or with a zero point, integer or float), code books (NF4, FP4 ...)
and float formats, per tensor, channel or group, with the block ranges chosen by an observer; the
microscaling schemes (rtn-mxfp4, rtn-nvfp4, ...). With FP8 weights per channel or tensor, "a8dyn" (per-token
dynamic) or "a8static" (per-tensor, calibrated max|x| / 448) also quantises the Linear's input to FP8 E4M3:
W8A8-FP8 ("rtn-fp8_e4m3-channel-a8dyn"). With a microscaling float scheme, "a4" (mxfp4, nvfp4), "a6"
(mxfp6_*) or "a8" (mxfp8_*) also quantises the input to the weight's block format on the fly
("rtn-nvfp4-a4": W4A4; weights/block_act.py); NVFP4 activations calibrate their tensor scale G_x.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, QuantSpec, quantize
from lowbit.core.observers import OBSERVERS
from lowbit.errors import LowbitError
from lowbit.methods.base import SchemeMethod, register_method
from lowbit.weights import BlockActWeight, FP8ActWeight, placeholders
from lowbit.weights.block_act import check_block_activation, input_global_scale
from lowbit.weights.fp8 import ACT_MAX, check_fp8_weight

# method words for block-format activations (RTN and GPTQ): the bits of the weight's element format
BLOCK_ACT_WORDS = {"a4": {"act_bits": 4}, "a6": {"act_bits": 6}, "a8": {"act_bits": 8}}


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec, observer: str = "minmax") -> QuantizedTensor:
    return quantize(weight, spec, observer)


@register_method
@dataclass(frozen=True)
class RTN(SchemeMethod):
    """scheme (default int4 g128 symmetric, fp16 scales); observer: minmax, mse or percentile."""

    name = "rtn"
    granularities = ("tensor", "channel", "group")
    words = {"mse": {"observer": "mse"}, "percentile": {"observer": "percentile"}, "minmax": {"observer": "minmax"},
             "a8dyn": {"activation": "token"}, "a8static": {"activation": "tensor"}, **BLOCK_ACT_WORDS}
    observer: str = "minmax"
    activation: str | None = None       # FP8 activations: "token" (dynamic) or "tensor" (static)
    act_bits: int | None = None         # block-format activations (MX / NVFP4 schemes): 4, 6 or 8

    def __post_init__(self):
        super().__post_init__()
        if self.observer not in OBSERVERS:
            raise LowbitError(f"observer must be one of {', '.join(sorted(OBSERVERS))}, got {self.observer!r}")
        if self.activation is not None:
            check_fp8_weight(placeholders.affine((1, 1), self.scheme))
            if self.activation not in ("token", "tensor"):
                raise LowbitError(f"activation must be 'token', 'tensor' or None, got {self.activation!r}")
        check_act_bits(self)

    @property
    def required_stats(self) -> tuple[str, ...]:
        return ("act_absmax",) if self.activation == "tensor" or needs_input_global_scale(self) else ()

    def quantize_weight(self, weight, stats=None):
        q = rtn_quantize(weight, self.scheme, self.observer)
        if self.act_bits is not None:
            return block_activations(self, q, stats)
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
        if self.act_bits is not None:
            return planned_block_activations(self, q)
        return q if self.activation is None else FP8ActWeight(q, self.activation, 1.0)


# ---------------------------------------------------------------------------------------------------
# Block-format activations (shared with GPTQ, which quantises the weight its own way and wraps it)

def check_act_bits(config) -> None:
    """One line unless act_bits is None or matches the config's block scheme (FP8 words exclude it)."""
    if config.act_bits is None:
        return
    if getattr(config, "activation", None) is not None:
        raise LowbitError(f"{config.name}: FP8 activations (a8dyn / a8static) and block-format activations "
                          f"(a{config.act_bits}) exclude each other")
    check_block_activation(config.scheme, config.act_bits)


def needs_input_global_scale(config) -> bool:
    """NVFP4 activations calibrate their tensor scale G_x from max|x| over the calibration tokens."""
    return config.act_bits is not None and config.scheme.scale_dtype == "nv"


def block_activations(config, q: QuantizedTensor, stats) -> BlockActWeight:
    """q wrapped with activations in its own block format; NVFP4's G_x = 448 * 6 / max|x| from `stats`."""
    if not needs_input_global_scale(config):
        return BlockActWeight(q)
    if stats is None or stats.n_tokens == 0:
        raise LowbitError(f"{config.short_name()} (NVFP4 activations) needs calibration data for its input "
                          f"global scale")
    return BlockActWeight(q, input_global_scale(float(stats.act_absmax().max())))


def planned_block_activations(config, q: QuantizedTensor) -> BlockActWeight:
    return BlockActWeight(q, 1.0 if needs_input_global_scale(config) else None)
