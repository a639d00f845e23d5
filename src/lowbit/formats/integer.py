"""Signed (two's complement) and unsigned integer grids of 1..8 bits."""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import NumberFormat


class IntFormat(NumberFormat):
    is_integer = True

    def __init__(self, bits: int, signed: bool):
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise LowbitError(f"integer formats take 1..8 bits, got {bits!r}")
        self.bits = bits
        self.signed = signed
        self.name = f"{'int' if signed else 'uint'}{bits}"
        self.qmin = -(1 << (bits - 1)) if signed else 0
        self.qmax = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1

    def _build_table(self) -> torch.Tensor:
        codes = torch.arange(1 << self.bits, dtype=torch.float32)
        if self.signed:
            codes = torch.where(codes > self.qmax, codes - (1 << self.bits), codes)
        return codes

    def round(self, x: torch.Tensor) -> torch.Tensor:
        # torch.round rounds half to even, the rounding the issue and IEEE both ask for.
        return torch.clamp(torch.round(x), self.qmin, self.qmax)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        q = self.round(x).to(torch.int32)
        return (q & ((1 << self.bits) - 1)).to(self.code_dtype)
