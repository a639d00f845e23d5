"""E8M0: the unsigned power-of-two scale format of the OCP Microscaling (MX) blocks."""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import NumberFormat

E8M0_BIAS = 127
E8M0_NAN = 0xFF


class E8M0Format(NumberFormat):
    """Code c decodes to 2**(c - 127); 0xFF is NaN; no sign, no zero."""

    name = "e8m0"
    bits = 8

    def _build_table(self) -> torch.Tensor:
        codes = torch.arange(256, dtype=torch.float64)
        table = torch.pow(2.0, codes - E8M0_BIAS)
        table[E8M0_NAN] = torch.nan
        return table.float()

    def exponent_code(self, exponent: torch.Tensor) -> torch.Tensor:
        """Code of 2**exponent, clamped to the representable -127..127."""
        return (torch.clamp(exponent, -E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest power of two (in the linear domain; ties go up). Scales must be positive."""
        x = x.double()
        if (x <= 0).any() or torch.isnan(x).any():
            raise LowbitError("e8m0 encodes positive scales only")
        mantissa, exp = torch.frexp(x)  # x = mantissa * 2**exp, mantissa in [0.5, 1)
        exponent = exp.to(torch.int64) - 1 + (mantissa >= 0.75).to(torch.int64)
        return self.exponent_code(exponent)

    def ceil(self, x: torch.Tensor) -> torch.Tensor:
        """Smallest power of two >= x, as a value: a scale that never clips the block."""
        mantissa, exp = torch.frexp(x.double())
        exponent = exp.to(torch.int64) - (mantissa == 0.5).to(torch.int64)
        return self.decode(self.exponent_code(exponent))
