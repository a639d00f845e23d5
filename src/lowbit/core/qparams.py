"""The quantisation equation: scales and zero points from a range, and the round trip through a format.

    code = encode(x / scale + zero)        x̂ = (decode(code) - zero) * scale

All functions work on blocks [rows, blocks per row, block size] with one scale and zero per block.
"""
from __future__ import annotations

import torch

from lowbit.core import mx
from lowbit.core.spec import QuantSpec
from lowbit.errors import LowbitError
from lowbit.formats import get_format

_TORCH_SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def round_zero(zero: torch.Tensor, zero_dtype: str) -> torch.Tensor:
    """A float zero point as stored at `zero_dtype` (round to nearest), back in float32."""
    return zero.to(TORCH_FLOAT_DTYPES[zero_dtype]).float()


def round_scale_up(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Round positive FP32 scales up to the nearest value of `scale_dtype`, so no block clips."""
    if scale_dtype == "fp32":
        return scale.float()
    if scale_dtype == "e8m0":
        return get_format("e8m0").ceil(scale).float()
    dtype = _TORCH_SCALE_DTYPES[scale_dtype]
    rounded = scale.to(dtype)
    up = torch.nextafter(rounded, torch.tensor(torch.inf, dtype=dtype))
    rounded = torch.where(rounded.float() < scale, up, rounded)
    if torch.isinf(rounded).any():
        raise LowbitError(f"a scale of {float(scale.max()):.4g} overflows {scale_dtype}; use scale_dtype='fp32'")
    return rounded.float()


def symmetric_capacity(spec: QuantSpec) -> float:
    """The level that a block's absmax maps to: the largest positive value above the zero point."""
    fmt = spec.number_format
    cap = fmt.max_value - spec.implied_zero
    if cap <= 0:
        raise LowbitError(f"{spec.format} has no positive levels; symmetric quantisation needs some")
    return cap


def global_scale(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """The per-tensor FP32 scale a spec needs besides its block scales (NVFP4's G), or None."""
    return mx.nv_global_scale(x.detach().abs().max(), spec.number_format) if spec.scale_dtype == mx.NV_SCALE else None


def scale_and_zero(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                   global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scale and zero point that map the range [lo, hi] onto the format's grid. MX scales
    follow the OCP rule and NVFP4 scales sit under the tensor's global scale (core/mx.py); without
    `global_scale` an NVFP4 spec takes it from the largest |lo|, |hi| given."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    fmt = spec.number_format
    if spec.scale_dtype == mx.MX_SCALE:
        scale = mx.mx_scale(torch.maximum(-lo, hi), fmt)
        return scale, torch.zeros_like(scale)
    if spec.scale_dtype == mx.NV_SCALE:
        amax = torch.maximum(-lo, hi)
        g = mx.nv_global_scale(amax.max(), fmt) if global_scale is None else global_scale
        scale = mx.nv_scale(amax, fmt, g)
        return scale, torch.zeros_like(scale)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / symmetric_capacity(spec)
    else:
        scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    # An all-zero block is represented exactly by any scale; 1 keeps the division finite.
    scale = round_scale_up(torch.where(scale > 0, scale, torch.ones_like(scale)), spec.scale_dtype)
    if spec.symmetric:
        zero = torch.full_like(scale, spec.implied_zero)
    elif spec.float_zero:
        zero = round_zero(fmt.qmin - lo / scale, spec.zero_dtype)
    else:
        zero = torch.clamp(fmt.qmin - torch.round(lo / scale), fmt.qmin, fmt.qmax)
    return scale, zero


def _saturate(levels: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """MX integer elements saturate symmetrically at ±qmax (the OCP reference code's rule for MXINT8)."""
    fmt = spec.number_format
    if spec.scale_dtype == mx.MX_SCALE and fmt.is_integer:
        return torch.clamp(levels, -fmt.qmax, fmt.qmax)
    return levels


def encode_blocks(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.scale_dtype in (mx.MX_SCALE, mx.NV_SCALE):   # exact quotients: ties of the decoded grid stay ties
        return spec.number_format.encode(_saturate(blocks.double() / scale[..., None].double(), spec))
    return spec.number_format.encode(blocks / scale[..., None] + zero[..., None])


def decode_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return (spec.number_format.decode(codes) - zero[..., None]) * scale[..., None]


def fake_quantize_blocks(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantise and dequantise in one step (no codes kept): what the model sees after quantisation."""
    levels = spec.number_format.round(_saturate(blocks / scale[..., None] + zero[..., None], spec))
    return (levels - zero[..., None]) * scale[..., None]
