"""Small IEEE-like binary floats: FP8 E4M3FN / E5M2, FP6 E3M2 / E2M3, FP4 E2M1, and FP16/BF16 as checks.

One parametrised class covers them all; the formats differ only in field widths, bias and which codes
are special:
  - "ieee": top exponent is Inf (mantissa 0) or NaN (E5M2, FP16, BF16)
  - "fn":   no Inf; only the all-ones code is NaN (E4M3FN)
  - "none": every code is a finite number (the MX element formats FP6 and FP4)
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import NumberFormat, reject_nan

SPECIALS = ("ieee", "fn", "none")


class FloatFormat(NumberFormat):
    def __init__(self, name: str, exp_bits: int, man_bits: int, bias: int, specials: str):
        if specials not in SPECIALS:
            raise LowbitError(f"unknown special-value policy {specials!r}")
        self.name = name
        self.exp_bits = exp_bits
        self.man_bits = man_bits
        self.bias = bias
        self.specials = specials
        self.bits = 1 + exp_bits + man_bits
        self.min_exponent = 1 - bias  # exponent of the smallest normal; subnormals share its quantum

    def _field_value(self, e: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Magnitude of exponent field e and mantissa field m, in float64 so that FP16/BF16 stay exact."""
        e = e.double()
        m = m.double()
        frac = m / (1 << self.man_bits)
        normal = torch.ldexp(1.0 + frac, (e - self.bias).to(torch.int64))
        subnormal = torch.ldexp(frac, torch.tensor(self.min_exponent, dtype=torch.int64))
        return torch.where(e == 0, subnormal, normal)

    def _build_table(self) -> torch.Tensor:
        codes = torch.arange(1 << self.bits, dtype=torch.int64)
        sign = (codes >> (self.bits - 1)) & 1
        e = (codes >> self.man_bits) & ((1 << self.exp_bits) - 1)
        m = codes & ((1 << self.man_bits) - 1)
        mag = self._field_value(e, m)
        top = (1 << self.exp_bits) - 1
        if self.specials == "ieee":
            mag = torch.where((e == top) & (m == 0), torch.inf, mag)
            mag = torch.where((e == top) & (m != 0), torch.nan, mag)
        elif self.specials == "fn":
            mag = torch.where((e == top) & (m == (1 << self.man_bits) - 1), torch.nan, mag)
        return torch.where(sign == 1, -mag, mag).float()

    @property
    def nan_code(self) -> int | None:
        """The code torch writes for NaN: all ones below the sign bit."""
        return None if self.specials == "none" else (1 << (self.bits - 1)) - 1

    def _positive_lookup(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted finite non-negative values and their codes, for value -> code lookup."""
        if not hasattr(self, "_pos"):
            half = self.table[: 1 << (self.bits - 1)].double()
            codes = torch.arange(half.numel())
            keep = torch.isfinite(half)
            vals, order = torch.sort(half[keep])
            self._pos = (vals, codes[keep][order])
        return self._pos

    def round_magnitude(self, a: torch.Tensor) -> torch.Tensor:
        """Round non-negative float64 magnitudes to the format: nearest, ties to even, saturating."""
        a = torch.clamp(a, max=self.max_value)
        _, exp = torch.frexp(a)
        exponent = torch.clamp(exp.to(torch.int64) - 1, min=self.min_exponent)
        quantum = torch.ldexp(torch.ones_like(a), exponent - self.man_bits)
        # a / quantum is exact (power-of-two divisor); torch.round is round-half-to-even.
        r = torch.round(a / quantum) * quantum
        return torch.clamp(r, max=self.max_value)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.nan_code is None:
            reject_nan(x, self.name)
        x64 = x.double()
        nan = torch.isnan(x64)
        r = self.round_magnitude(torch.nan_to_num(x64.abs(), nan=0.0, posinf=torch.inf))
        vals, codes = self._positive_lookup()
        idx = torch.searchsorted(vals, r.reshape(-1)).reshape(r.shape)
        code = codes[idx]
        code = code | (torch.signbit(x64).long() << (self.bits - 1))
        if self.nan_code is not None:
            code = torch.where(nan, self.nan_code, code)
        return code.to(self.code_dtype)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        r = self.round_magnitude(x.double().abs())
        return torch.where(torch.signbit(x), -r, r).to(torch.float32)


TORCH_FLOAT8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def to_float8(x: torch.Tensor, name: str) -> torch.Tensor:
    """`x` (any float dtype, any shape) as torch's float8 dtype of format `name` ("fp8_e4m3" or "fp8_e5m2"):
    round to nearest, ties to even, from float32 (one rounding). Finite values beyond the largest finite
    value saturate to ±max (448 / 57344), as FP8 casts do in NVIDIA Transformer Engine ("satfinite") and
    the OCP FP8 spec's saturating mode; torch's own cast would give inf for E5M2 and ±448 for an inf in
    E4M3FN. Non-finite values become NaN in both formats, so a loss scaler still sees the overflow.
    Matches FloatFormat.round bit for bit on finite values (tests/formats/test_minifloat.py)."""
    if name not in TORCH_FLOAT8:
        raise LowbitError(f"no torch float8 dtype for {name!r}; known: {', '.join(TORCH_FLOAT8)}")
    dtype = TORCH_FLOAT8[name]
    top = torch.finfo(dtype).max
    x = x.float()
    y = x.clamp(-top, top)   # a new tensor; clamp keeps NaN but turns ±inf into ±top ...
    y += x - x               # ... so add 0 where x is finite and NaN where it is not (no branch, no sync)
    return y.to(dtype)
