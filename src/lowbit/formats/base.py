"""What every number format offers: exact encode to bit patterns, decode to values, its value table."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lowbit.errors import LowbitError


class NumberFormat(ABC):
    """A set of representable numbers with a bit encoding of `bits` bits per element.

    `encode` maps real values to codes (bit patterns as unsigned integers) by rounding to the nearest
    representable value and saturating at the largest finite one; `decode` maps codes back.
    Formats of up to 16 bits are table driven: `table[code]` is the decoded value of each code.
    """

    name: str
    bits: int
    is_integer: bool = False

    @abstractmethod
    def _build_table(self) -> torch.Tensor:
        """float32 value of every code 0 .. 2**bits - 1 (NaN/Inf where the format has them)."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of the representable values nearest to `x` (saturating)."""

    @property
    def table(self) -> torch.Tensor:
        if not hasattr(self, "_table"):
            self._table = self._build_table()
        return self._table

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bits <= 8 else torch.int32

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table[codes.long()]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Values of `x` rounded onto this format (fake quantisation without a scale)."""
        return self.decode(self.encode(x))

    def values(self) -> torch.Tensor:
        """Every finite representable value once, sorted (+0 and -0 count as one)."""
        if not hasattr(self, "_values"):
            t = self.table
            self._values = torch.unique(t[torch.isfinite(t)] + 0.0)  # + 0.0 turns -0 into +0
        return self._values

    @property
    def max_value(self) -> float:
        return float(self.values()[-1])

    @property
    def min_value(self) -> float:
        return float(self.values()[0])

    @property
    def max_abs(self) -> float:
        """The largest magnitude, the value a symmetric scale maps the block's absmax onto."""
        return max(abs(self.min_value), abs(self.max_value))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.bits} bits)>"


def reject_nan(x: torch.Tensor, fmt_name: str) -> None:
    if torch.isnan(x).any():
        raise LowbitError(f"{fmt_name} has no NaN encoding, but the input contains NaN")
