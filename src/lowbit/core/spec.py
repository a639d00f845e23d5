"""QuantSpec: the scheme, i.e. which numbers a tensor is stored in (not how they are chosen)."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.formats import NumberFormat, canonical_name, get_format

GRANULARITIES = ("tensor", "channel", "group", "token")
# "e8m0": powers of two rounded up (never clipping); "mx": E8M0 by the OCP MX v1.0 rule (floor(log2 amax) -
# emax_elem, elements saturate); "nv": FP8 E4M3 block scales under one FP32 tensor scale (NVFP4). core/mx.py.
SCALE_DTYPES = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8, "mx": 8, "nv": 8}
# "int": an integer zero point on the grid, stored in `bits` bits; a float dtype: a free float zero point
# (HQQ's), stored at that precision.
ZERO_DTYPES = {"int": None, "fp32": 32, "fp16": 16, "bf16": 16}


@dataclass(frozen=True)
class QuantSpec:
    """x ≈ (decode(code) - zero) * scale, with one (scale, zero) per block of the tensor.

    format:      a registered number format ("int4", "uint4", "fp8_e4m3", "nf4", ...)
    granularity: "tensor" (one block), "channel" (one per row: a Linear's output channel),
                 "group" (group_size consecutive elements of a row), "token" (one per row of
                 activations, i.e. every dim but the last)
    symmetric:   zero point fixed (0 on a signed grid, the middle code on an unsigned one) and not
                 stored; asymmetric stores a zero point per block (integer formats only)
    scale_dtype: how scales are stored (fp32, fp16, bf16, e8m0); scales are rounded up to it so the
                 stored scale never clips the block. "mx" and "nv" are the microscaling rules (OCP MX
                 E8M0 by floor(log2 amax) - emax, saturating; NVFP4's E4M3 under an FP32 tensor scale)
    zero_dtype:  how an asymmetric zero point is stored: "int" (on the grid, `bits` bits, as GPTQ and
                 AWQ store it) or a float dtype (a free float zero point, as HQQ stores it)

    This one value is the scheme every method receives; `lowbit.methods.names` spells it in short names.
    """

    format: str = "int8"
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "fp16"
    zero_dtype: str = "int"

    def __post_init__(self):
        if not isinstance(self.format, str):
            raise LowbitError(f"a format is a name such as 'int4' or 'nf4', got {self.format!r}")
        if not isinstance(self.symmetric, bool):
            raise LowbitError(f"symmetric must be True or False, got {self.symmetric!r}")
        object.__setattr__(self, "format", canonical_name(self.format))
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise LowbitError(f"group granularity needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise LowbitError(f"group_size is only meaningful with granularity='group', not {self.granularity!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.zero_dtype not in ZERO_DTYPES:
            raise LowbitError(f"zero_dtype must be one of {', '.join(ZERO_DTYPES)}, got {self.zero_dtype!r}")
        if not self.symmetric and self.scale_dtype in ("mx", "nv"):
            raise LowbitError(f"{self.scale_dtype} scales are for symmetric grids (MX and NVFP4 store no zero point)")
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
    def float_zero(self) -> bool:
        """Whether the zero point is a free float (stored at zero_dtype) rather than a grid integer."""
        return not self.symmetric and self.zero_dtype != "int"

    @property
    def zero_bits(self) -> int:
        """Bits stored per block for the zero point (0 when it is implied by the spec)."""
        if self.symmetric:
            return 0
        return ZERO_DTYPES[self.zero_dtype] or self.bits

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

    def updated(self, *, format: str | None = None, bits: int | None = None, group_size=..., symmetric=None,
                scale_dtype: str | None = None, zero_dtype: str | None = None) -> "QuantSpec":
        """This scheme with some fields changed. `bits` picks an integer grid of that width (signed when
        symmetric, unsigned otherwise); `symmetric` alone moves an integer grid between int and uint;
        `group_size` None means one scale per output channel, an int groups of that size."""
        if bits is not None and format is not None:
            raise LowbitError(f"give either bits ({bits!r}) or a format ({format!r}), not both")
        if symmetric is not None and not isinstance(symmetric, bool):
            raise LowbitError(f"symmetric must be True or False, got {symmetric!r}")
        if format is not None and not isinstance(format, str):
            raise LowbitError(f"a format is a name such as 'int4' or 'nf4', got {format!r}")
        fmt = self.format if format is None else canonical_name(format)
        is_int = get_format(fmt).is_integer
        if format is not None and is_int and symmetric is None:
            symmetric = get_format(fmt).signed          # "uint4" means a grid with a zero point, as in short names
        sym = self.symmetric if symmetric is None else symmetric
        if bits is not None:
            if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
                raise LowbitError(f"integer grids take 1..8 bits, got {bits!r}")
            if not is_int:
                raise LowbitError(f"bits choose an integer grid; this scheme's format is {fmt} (give a format instead)")
            fmt, is_int = canonical_name(f"{'int' if sym else 'uint'}{bits}"), True
        elif is_int:       # a symmetric grid is signed, a grid with a zero point unsigned: one spelling each
            fmt = canonical_name(f"{'int' if sym else 'uint'}{get_format(fmt).bits}")
        granularity, group = self.granularity, self.group_size
        if group_size is not ...:
            granularity, group = ("channel", None) if group_size is None else ("group", group_size)
        return QuantSpec(fmt, granularity, group, sym, self.scale_dtype if scale_dtype is None else scale_dtype,
                         self.zero_dtype if zero_dtype is None else zero_dtype)

    def to_dict(self) -> dict:
        return {"format": self.format, "granularity": self.granularity, "group_size": self.group_size,
                "symmetric": self.symmetric, "scale_dtype": self.scale_dtype, "zero_dtype": self.zero_dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        if not isinstance(d, dict):
            raise LowbitError(f"a scheme must be a dict of QuantSpec fields, got {type(d).__name__}")
        keys = ("format", "granularity", "group_size", "symmetric", "scale_dtype", "zero_dtype")
        unknown = sorted(set(d) - set(keys))
        missing = [k for k in ("format", "granularity", "symmetric") if k not in d]
        if unknown or missing:
            raise LowbitError(f"a scheme dict {'has unknown key ' + repr(unknown[0]) if unknown else 'lacks ' + repr(missing[0])}")
        return cls(**{k: d[k] for k in keys if k in d})
