"""QuantSpec: the scheme, i.e. which numbers a tensor is stored in (not how they are chosen)."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.formats import NumberFormat, canonical_name, get_format

GRANULARITIES = ("tensor", "channel", "group", "token")
SCALE_DTYPES = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8}


@dataclass(frozen=True)
class QuantSpec:
    """x ≈ (decode(code) - zero) * scale, with one (scale, zero) per block of the tensor.

    format:      a registered number format ("int4", "uint4", "fp8_e4m3", "nf4", ...)
    granularity: "tensor" (one block), "channel" (one per row: a Linear's output channel),
                 "group" (group_size consecutive elements of a row), "token" (one per row of
                 activations, i.e. every dim but the last)
    symmetric:   zero point fixed (0 on a signed grid, the middle code on an unsigned one) and not
                 stored; asymmetric stores an integer zero point per block (integer formats only)
    scale_dtype: how scales are stored (fp32, fp16, bf16, e8m0); scales are rounded up to it so the
                 stored scale never clips the block
    """

    format: str = "int8"
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "fp16"

    def __post_init__(self):
        object.__setattr__(self, "format", canonical_name(self.format))
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise LowbitError(f"group granularity needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise LowbitError(f"group_size is only meaningful with granularity='group', not {self.granularity!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if not self.symmetric and not self.number_format.is_integer:
            raise LowbitError(f"asymmetric quantisation needs an integer grid; {self.format} is symmetric only")

    @property
    def number_format(self) -> NumberFormat:
        return get_format(self.format)

    @property
    def bits(self) -> int:
        return self.number_format.bits

    @property
    def scale_bits(self) -> int:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def zero_bits(self) -> int:
        """Bits stored per block for the zero point (0 when it is implied by the spec)."""
        return 0 if self.symmetric else self.bits

    @property
    def implied_zero(self) -> float:
        """The fixed zero point of a symmetric spec: 0, or the middle code of an unsigned grid."""
        fmt = self.number_format
        if fmt.is_integer and not fmt.signed:
            return float(1 << (fmt.bits - 1))
        return 0.0

    def bits_per_element(self, block_size: int) -> float:
        """Storage bits per element for blocks of `block_size` elements, scale and zero included."""
        return self.bits + (self.scale_bits + self.zero_bits) / block_size

    def to_dict(self) -> dict:
        return {"format": self.format, "granularity": self.granularity, "group_size": self.group_size,
                "symmetric": self.symmetric, "scale_dtype": self.scale_dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**{k: d[k] for k in ("format", "granularity", "group_size", "symmetric", "scale_dtype")})
