"""Fast CPU dequantisation of packed integer weights (the hot path of QuantLinear.forward).

The generic route (unpack to codes, decode through the format's value table) gathers through int64
indices; integer grids need no table: a code is its level, sign-extended when the grid is signed.
Results equal the generic route exactly: the same (level - zero) * scale in float32.
"""
from __future__ import annotations

import torch

from lowbit.core import QuantSpec, block_shape, unpack_bits


def int_levels(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Levels of uint8 codes as float32: two's complement sign extension by a shift pair on int8."""
    if not signed:
        return codes.to(torch.float32)
    shift = 8 - bits
    return ((codes << shift).view(torch.int8) >> shift).to(torch.float32)


def dequantize_int_packed(packed: torch.Tensor, spec: QuantSpec, shape: torch.Size,
                          scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[out, in] float32 weights from packed integer codes, one (scale, zero) per block."""
    fmt = spec.number_format
    codes = unpack_bits(packed, spec.bits, shape.numel())
    levels = int_levels(codes, spec.bits, fmt.signed).reshape(block_shape(shape, spec))
    return ((levels - zero[..., None]) * scale[..., None]).reshape(shape)
