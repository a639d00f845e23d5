"""Rounding FP32 values to the precision of wider float types: BF16, FP16, TF32.

TF32 (the tensor-core input format) keeps FP32's 8-bit exponent and a 10-bit mantissa; it has no
storage type, so it is expressed as FP32 values whose low 13 mantissa bits are zero.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError

FP32_MANTISSA_BITS = 23


def round_mantissa(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Round FP32 values to `mantissa_bits` explicit mantissa bits, to nearest, ties to even.

    Works on the bit pattern: adding half an ulp of the target (minus one, plus the target's lowest
    kept bit) and truncating is round-half-to-even; a carry into the exponent is correct rounding.
    NaN and Inf pass through.
    """
    if not 0 <= mantissa_bits <= FP32_MANTISSA_BITS:
        raise LowbitError(f"mantissa bits must be 0..23, got {mantissa_bits}")
    x = x.float().contiguous()
    drop = FP32_MANTISSA_BITS - mantissa_bits
    if drop == 0:
        return x.clone()
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    lowest_kept = (bits >> drop) & 1
    rounded = (bits + ((1 << (drop - 1)) - 1) + lowest_kept) & ~((1 << drop) - 1) & 0xFFFFFFFF
    out = rounded.to(torch.int64)
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32).view(torch.float32)
    return torch.where(torch.isfinite(x), out, x)


def round_to_float(x: torch.Tensor, name: str) -> torch.Tensor:
    """FP32 values rounded to the precision of `name` (fp32, tf32, fp16, bf16), returned as FP32."""
    x = x.float()
    if name == "fp32":
        return x.clone()
    if name == "tf32":
        return round_mantissa(x, 10)
    if name == "bf16":
        return x.to(torch.bfloat16).float()
    if name == "fp16":
        return x.to(torch.float16).float()
    raise LowbitError(f"unknown float precision {name!r}; expected fp32, tf32, fp16 or bf16")
