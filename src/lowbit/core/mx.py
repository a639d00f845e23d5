"""Scale rules of the microscaling block formats, on plain tensors.

OCP Microscaling (MX) v1.0 (scale_dtype "mx"): a block of k = 32 elements along the reduction dim shares
one E8M0 scale X = 2^e, code e + 127, with (the spec's conversion rule, section 6.3)

    e = floor(log2(max_i |V_i|)) - emax_elem        clamped to -127 .. 127
    P_i = V_i / X  rounded to the element format (round to nearest, ties to even), saturating at ± max

emax_elem is the exponent of the element format's largest normal: 8 (FP8 E4M3), 15 (E5M2), 4 (FP6
E3M2), 2 (E2M3, FP4 E2M1), 0 (INT8: two's complement with an implicit 2^-6, so P = code / 64, and the
code saturates at ±127, as the reference code microsoft/microxcaling does). A block whose amax is 0 gets
e = -127 (code 0); a block holding NaN or Inf gets the NaN scale 0xFF (every element then reads NaN).

NVFP4 (scale_dtype "nv", NVIDIA; ModelOpt, compressed-tensors): blocks of 16 E2M1 elements, an FP8
E4M3 block scale s and one FP32 per-tensor global scale G (compressed-tensors' `weight_global_scale`,
a divisor):  G = 448 * 6 / amax(tensor),  s = e4m3(clamp(amax_block / 6 * G, 2^-6, 448)),
x = e2m1 * (s / G). The effective scale s / G (float32) is what a QuantizedTensor holds as `scale`;
s is recovered exactly as e4m3(scale * G).

In lowbit a scale multiplies the grid's *levels* (decode(code)): for float elements the level is P and
the scale is X; for INT8 the level is the integer code, so the scale is X * 2^-6.
"""
from __future__ import annotations

import math

import torch

from lowbit.formats import get_format

MX_BLOCK, NV_BLOCK = 32, 16
MX_SCALE, NV_SCALE = "mx", "nv"
E8M0_BIAS, E8M0_NAN = 127, 0xFF
E4M3_MAX, E4M3_MIN_NORMAL = 448.0, 2.0 ** -6


def mx_element(fmt) -> tuple[int, int]:
    """(emax_elem, log2 of the level unit) of an MX element format: floats (e.g. E2M1: (2, 0)) read
    their level as P; an integer grid of b bits reads P = code * 2^-(b-2) (MXINT8: (0, -6))."""
    if fmt.is_integer:
        return 0, -(fmt.bits - 2)
    return math.floor(math.log2(fmt.max_value)), 0


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) of positive finite float values, exact (from the float's exponent), as int64."""
    _, exp = torch.frexp(a.double())
    return exp.to(torch.int64) - 1


def mx_exponents(amax: torch.Tensor, fmt) -> torch.Tensor:
    """The shared exponent e per block [int64, same shape as amax]: the OCP rule clamped to -127..127;
    128 marks the NaN scale (amax NaN or Inf)."""
    emax, _ = mx_element(fmt)
    amax = amax.double()
    finite = torch.isfinite(amax)
    positive = finite & (amax > 0)
    e = _floor_log2(torch.where(positive, amax, torch.ones_like(amax))) - emax
    e = torch.where(positive, e, torch.full_like(e, -E8M0_BIAS))
    e = torch.clamp(e, -E8M0_BIAS, E8M0_BIAS)
    return torch.where(finite, e, torch.full_like(e, E8M0_BIAS + 1))


def mx_scale(amax: torch.Tensor, fmt) -> torch.Tensor:
    """float32 scale per block (X times the level unit; NaN for the NaN scale) of blocks with `amax`."""
    _, unit = mx_element(fmt)
    e = mx_exponents(amax, fmt)
    scale = torch.ldexp(torch.ones_like(e, dtype=torch.float64), e + unit)
    return torch.where(e > E8M0_BIAS, torch.nan, scale).float()


def mx_scale_codes(scale: torch.Tensor, fmt) -> torch.Tensor:
    """E8M0 codes (uint8) of MX scales as held by a QuantizedTensor (0xFF for NaN)."""
    _, unit = mx_element(fmt)
    nan = torch.isnan(scale)
    e = _floor_log2(torch.where(nan, torch.ones_like(scale), scale)) - unit
    return torch.where(nan, E8M0_NAN, torch.clamp(e + E8M0_BIAS, 0, 254)).to(torch.uint8)


def mx_scale_values(codes: torch.Tensor, fmt) -> torch.Tensor:
    """float32 scales from E8M0 codes: 2^(code - 127) times the level unit, NaN for 0xFF."""
    _, unit = mx_element(fmt)
    c = codes.to(torch.int64)
    scale = torch.ldexp(torch.ones_like(c, dtype=torch.float64), c - E8M0_BIAS + unit)
    return torch.where(c == E8M0_NAN, torch.nan, scale).float()


def nv_global_scale(amax: torch.Tensor | float, fmt=None) -> torch.Tensor:
    """G = 448 * max(fmt) / amax as float32 [1] (compressed-tensors' rule); 1 when amax is 0 or not finite."""
    fmax = (fmt or get_format("fp4_e2m1")).max_abs
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    g = torch.tensor([E4M3_MAX * fmax], dtype=torch.float32) / a
    return torch.where(torch.isfinite(g) & (g > 0), g, torch.ones_like(g))


def nv_block_scales(amax: torch.Tensor, fmt, global_scale: torch.Tensor) -> torch.Tensor:
    """The FP8 E4M3 block scales s (float32 values) of blocks with `amax` under the global scale G."""
    s = (amax.float() / fmt.max_abs) * global_scale.float()
    s = torch.clamp(torch.nan_to_num(s, nan=E4M3_MAX), E4M3_MIN_NORMAL, E4M3_MAX)
    return s.to(torch.float8_e4m3fn).float()


def nv_scale(amax: torch.Tensor, fmt, global_scale: torch.Tensor) -> torch.Tensor:
    """The effective float32 scale s / G per block."""
    return nv_block_scales(amax, fmt, global_scale) / global_scale.float()


def nv_recover_block_scales(scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The E4M3 block scales (torch.float8_e4m3fn) behind effective scales s / G: e4m3(scale * G) is s
    exactly, since scale * G lies within two float32 ulps of s and E4M3 values are 2^20 ulps apart."""
    return (scale.double() * global_scale.double()).to(torch.float8_e4m3fn)
