"""NF4 and FP4 blockwise 4-bit quantisation with double quantisation, as bitsandbytes computes it.

The tensor is flattened row-major and cut into blocks of `block_size` elements (64 by default); each
block is scaled by its absolute maximum onto [-1, 1] and every element takes the nearest of 16 levels
(NF4: quantiles of N(0, 1); FP4: bnb's E2M1 variant). The result is bnb's own layout (weights/bnb4.py).

Every step reproduces bitsandbytes 0.50 on the CPU byte for byte (tests/methods/test_nf4.py), including
its arithmetic: full blocks multiply by 1/absmax, the trailing partial block divides by it, and an odd
element count is padded with the code of 0. (The same grids on row groups, through the generic
equation, are `rtn-nf4-b64` and `gptq-nf4-b64`.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.methods.base import MethodConfig, register_method
from lowbit.weights import placeholders
from lowbit.weights.bnb4 import (COMPUTE_DTYPES, FORMAT_OF, Quantized4bit, check_block_size, check_quant_type,
                                 double_quantize, pack_nibbles)

# bnb clamps a block's absmax to this before taking its reciprocal (a zero block then maps to code(0))
TINY_ABSMAX = 1e-38


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise LowbitError("4-bit quantisation takes a floating-point tensor")
    if x.numel() == 0:
        raise LowbitError("cannot quantise an empty tensor")
    if not torch.isfinite(x).all():
        raise LowbitError("the tensor to quantise contains NaN or Inf")


def blockwise_absmax_scaling(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values scaled into [-1, 1], absmax per block) of a flat float32 tensor, with bnb's arithmetic."""
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=TINY_ABSMAX))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=TINY_ABSMAX)  # stored clamped, unlike full blocks
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (tail / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def quantize_4bit_codes(x: torch.Tensor, block_size: int = 64, quant_type: str = "nf4"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2)], float32 absmax [ceil(n/block_size)]) of x flattened row-major."""
    _check_input(x)
    check_block_size(block_size)
    scaled, absmax = blockwise_absmax_scaling(x.detach().reshape(-1).float(), block_size)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # bnb pads the value 0, not the code 0
    codes = get_format(FORMAT_OF[check_quant_type(quant_type)]).encode(scaled)
    return pack_nibbles(codes), absmax


def quantize_4bit(x: torch.Tensor, block_size: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False) -> Quantized4bit:
    """bitsandbytes' quantize_4bit(x, blocksize, quant_type, compress_statistics=double_quant)."""
    packed, absmax = quantize_4bit_codes(x, block_size, quant_type)
    q = Quantized4bit(packed, absmax, x.shape, block_size, quant_type, x.dtype)
    if double_quant:
        q.absmax, q.nested_absmax, q.nested_offset = double_quantize(absmax)
    return q


@register_method
@dataclass(frozen=True)
class NF4(MethodConfig):
    """Calibration-free NF4 (QLoRA's storage type). Short names: nf4, nf4-dq, nf4-b128, nf4-dq-fp32 ...
    (dq = double quantisation; bN = block size; bf16/fp16/fp32 = the Linear's compute dtype)."""

    name = "nf4"
    quant_type: ClassVar[str] = "nf4"
    words = {"dq": {"double_quant": True}, "b": "block_size",
             **{d: {"compute_dtype": d} for d in COMPUTE_DTYPES}}
    block_size: int = 64
    double_quant: bool = False
    compute_dtype: str = "bf16"

    def __post_init__(self):
        check_block_size(self.block_size)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise LowbitError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    def quantize_weight(self, weight: torch.Tensor, stats=None) -> Quantized4bit:
        return quantize_4bit(weight, self.block_size, self.quant_type, self.double_quant)

    def planned_weight(self, shape, layer) -> Quantized4bit:
        return placeholders.bnb4(shape, self.block_size, self.quant_type, self.double_quant)

    def module_options(self) -> dict:
        return {"compute_dtype": COMPUTE_DTYPES[self.compute_dtype]}


@register_method
@dataclass(frozen=True)
class FP4(NF4):
    """bitsandbytes' FP4 (E2M1 with its own code order), same layout and options as NF4."""

    name = "fp4"
    quant_type: ClassVar[str] = "fp4"
