"""NF4 and FP4 blockwise 4-bit quantisation with double quantisation, as bitsandbytes stores it.

The tensor is flattened row-major and cut into blocks of `block_size` elements (64 by default); each
block is scaled by its absolute maximum onto [-1, 1] and every element takes the nearest of 16 levels
(NF4: quantiles of N(0, 1); FP4: bnb's E2M1 variant). Two codes share a byte, the FIRST element in
the HIGH nibble. Double quantisation stores the fp32 absmax values as 8-bit codes of the signed
"dynamic" map, blockwise (256 absmax per block) after subtracting their mean.

Every step reproduces bitsandbytes 0.50 on the CPU byte for byte (tests/methods/test_nf4.py), including
its arithmetic: full blocks multiply by 1/absmax, the trailing partial block divides by it, an odd
element count is padded with the code of 0, and the 8-bit absmax codes come from bnb's 65536-step
lookup grid rather than an exact nearest-value search (the two differ for ~0.2% of values).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.methods.base import MethodConfig, register_method

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # what bnb accepts (and its kernels assume)
NESTED_BLOCK_SIZE = 256                                   # absmax values per block of the second level
FORMAT_OF = {"nf4": "nf4", "fp4": "bnb_fp4"}              # bnb quant_type -> lowbit code book
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in COMPUTE_DTYPES.items()}
LUT_STEPS = 65536                                         # bnb's CPU grid over [-1, 1] for 8-bit codes
# bnb clamps a block's absmax to this before taking its reciprocal (a zero block then maps to code(0))
TINY_ABSMAX = 1e-38


# ---------------------------------------------------------------------------------------------------
# Code books and packing

def code_table(quant_type: str) -> torch.Tensor:
    """The 16 float32 levels indexed by code (bnb's quant_map)."""
    return get_format(FORMAT_OF[check_quant_type(quant_type)]).table.clone()


@lru_cache(maxsize=None)
def _dynamic_map() -> torch.Tensor:
    # Dettmers' signed dynamic 8-bit map: for each decade 10^-6 .. 10^0, the midpoints of 2^k equal
    # steps across [0.1, 1] (k = 0..6 from the smallest decade up), both signs, plus 0 and 1.
    # Built with float32 linspace and midpoints as bnb builds it, so every level has the same bits.
    values: list[float] = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1, 2 ** k + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (k - 6)
        values += (decade * mids).tolist() + (-decade * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """The 256 sorted float32 levels of the signed 8-bit dynamic map (bnb's nested_quant_map)."""
    return _dynamic_map().clone()


@lru_cache(maxsize=None)
def _dynamic_lut() -> torch.Tensor:
    # bnb's CPU kernel does not search the map: it rounds x onto 65536 equally spaced points of [-1, 1]
    # and looks up, per point, the level whose midpoint interval holds it (a point on a midpoint goes down).
    levels = _dynamic_map()
    midpoints = 0.5 * (levels[:-1] + levels[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_STEPS, dtype=torch.float32)) / float(LUT_STEPS - 1)
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pairs of 4-bit codes into bytes, first code in the high nibble (bnb's order; lowbit.core.pack_bits
    puts the first code low). An even number of codes is expected: the caller pads as its format says."""
    flat = codes.reshape(-1).to(torch.uint8)
    assert flat.numel() % 2 == 0, "pad to an even number of codes first"
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n codes of high-nibble-first packed bytes, as uint8."""
    p = packed.reshape(-1)
    if p.numel() * 2 < n:
        raise LowbitError(f"packed data holds {p.numel()} bytes, {(n + 1) // 2} needed for {n} codes")
    return torch.stack((p >> 4, p & 0x0F), dim=1).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------------
# The 4-bit level

def check_quant_type(quant_type: str) -> str:
    if quant_type not in FORMAT_OF:
        raise LowbitError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def check_block_size(block_size: int) -> int:
    if block_size not in BLOCK_SIZES:
        raise LowbitError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))} (bitsandbytes' set), "
                          f"got {block_size!r}")
    return block_size


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise LowbitError("4-bit quantisation takes a floating-point tensor")
    if x.numel() == 0:
        raise LowbitError("cannot quantise an empty tensor")
    if not torch.isfinite(x).all():
        raise LowbitError("the tensor to quantise contains NaN or Inf")


def blockwise_absmax_scaling(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values scaled into [-1, 1], absmax per block) of a flat float32 tensor, with bnb's arithmetic."""
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=TINY_ABSMAX))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=TINY_ABSMAX)  # stored clamped, unlike full blocks
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (tail / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def quantize_4bit_codes(x: torch.Tensor, block_size: int = 64, quant_type: str = "nf4"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2)], float32 absmax [ceil(n/block_size)]) of x flattened row-major."""
    _check_input(x)
    check_block_size(block_size)
    scaled, absmax = blockwise_absmax_scaling(x.detach().reshape(-1).float(), block_size)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # bnb pads the value 0, not the code 0
    codes = get_format(FORMAT_OF[check_quant_type(quant_type)]).encode(scaled)
    return pack_nibbles(codes), absmax


def dequantize_4bit_codes(packed: torch.Tensor, absmax: torch.Tensor, shape, block_size: int,
                          quant_type: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """level(code) * absmax(block) in float32, then rounded once to `dtype`."""
    n = torch.Size(shape).numel()
    levels = get_format(FORMAT_OF[quant_type]).table[unpack_nibbles(packed, n).long()]
    scale = absmax.float().repeat_interleave(block_size)[:n]
    return (levels * scale).reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Double quantisation: 8-bit blockwise codes of the absmax values

def quantize_blockwise_8bit(x: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of the dynamic map, float32 absmax per block) of a flat float32 tensor, as bnb's CPU
    kernel computes them: x * (1/absmax), clamped, rounded onto its grid, looked up."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, (-n) % block_size)).reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # a zero block gets code 0
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    grid_index = (((v + 1.0) * 0.5) * float(LUT_STEPS - 1) + 0.5).to(torch.int64)  # truncation, as C does
    codes = _dynamic_lut()[grid_index]
    codes = torch.where((absmax > 0)[:, None], codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor,
                              block_size: int = NESTED_BLOCK_SIZE) -> torch.Tensor:
    n = codes.numel()
    return _dynamic_map()[codes.reshape(-1).long()] * absmax.float().repeat_interleave(block_size)[:n]


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 nested absmax, float32 offset) with absmax ≈ level(code) * nested + offset."""
    offset = absmax.mean()
    codes, nested = quantize_blockwise_8bit(absmax - offset)
    return codes, nested, offset


def double_dequantize(codes: torch.Tensor, nested: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return dequantize_blockwise_8bit(codes, nested) + offset.float()


# ---------------------------------------------------------------------------------------------------
# The quantised tensor

@dataclass
class Quantized4bit:
    """A tensor in bnb's 4-bit layout: what the 4-bit Linear holds and the bnb exporter writes.

    packed:        uint8 [ceil(n/2)], two codes a byte, first in the high nibble
    absmax:        float32 [n_blocks]; or, double-quantised, uint8 [n_blocks] codes of the dynamic map
    nested_absmax: float32 [ceil(n_blocks/256)] (double quantisation only)
    nested_offset: float32 0-dim, the mean subtracted before the second level (double quantisation only)
    dtype:         the dtype of the tensor that was quantised (what dequantize() returns by default)
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    block_size: int = 64
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.float32
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()

    @property
    def n_blocks(self) -> int:
        return self.absmax.numel()

    def block_absmax(self) -> torch.Tensor:
        """float32 absmax per block, decoded from the second level when double-quantised."""
        if self.double_quant:
            return double_dequantize(self.absmax, self.nested_absmax, self.nested_offset)
        return self.absmax.float()

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.packed, self.numel).reshape(self.shape)

    def quant_map(self) -> torch.Tensor:
        return code_table(self.quant_type)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_4bit_codes(self.packed, self.block_absmax(), self.shape, self.block_size,
                                     self.quant_type, dtype or self.dtype)

    @property
    def storage_bits(self) -> int:
        """Codes, plus per block an fp32 absmax, or an 8-bit code with one fp32 per 256 blocks and one fp32
        offset. The fixed code tables (16 and 256 floats, the same for every tensor) are not counted."""
        bits = 8 * self.packed.numel()
        if self.double_quant:
            return bits + 8 * self.n_blocks + 32 * self.nested_absmax.numel() + 32
        return bits + 32 * self.n_blocks

    @property
    def bits_per_element(self) -> float:
        return self.storage_bits / self.numel

    @property
    def nbytes(self) -> int:
        return (self.storage_bits + 7) // 8


def quantize_4bit(x: torch.Tensor, block_size: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False) -> Quantized4bit:
    """bitsandbytes' quantize_4bit(x, blocksize, quant_type, compress_statistics=double_quant)."""
    packed, absmax = quantize_4bit_codes(x, block_size, quant_type)
    q = Quantized4bit(packed, absmax, x.shape, block_size, quant_type, x.dtype)
    if double_quant:
        q.absmax, q.nested_absmax, q.nested_offset = double_quantize(absmax)
    return q


# ---------------------------------------------------------------------------------------------------
# Method configs: "nf4" and "fp4"

@register_method
@dataclass(frozen=True)
class NF4(MethodConfig):
    """Calibration-free NF4 (QLoRA's storage type). Short names: nf4, nf4-dq, nf4-b128, nf4-dq-fp32 ...
    (dq = double quantisation; bN = block size; bf16/fp16/fp32 = the Linear's compute dtype)."""

    name = "nf4"
    quant_type: ClassVar[str] = "nf4"
    block_size: int = 64
    double_quant: bool = False
    compute_dtype: str = "bf16"

    def __post_init__(self):
        check_block_size(self.block_size)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise LowbitError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    def quantize_weight(self, weight: torch.Tensor, stats=None) -> Quantized4bit:
        return quantize_4bit(weight, self.block_size, self.quant_type, self.double_quant)

    def make_module(self, q: Quantized4bit, bias: torch.Tensor | None = None):
        from lowbit.nn.linear4bit import Linear4bit

        return Linear4bit.from_quantized(q, bias, COMPUTE_DTYPES[self.compute_dtype])

    def short_name(self) -> str:
        words = [self.name]
        if self.double_quant:
            words.append("dq")
        if self.block_size != 64:
            words.append(f"b{self.block_size}")
        if self.compute_dtype != "bf16":
            words.append(self.compute_dtype)
        return "-".join(words)

    @classmethod
    def from_short_name(cls, rest):
        kwargs: dict = {}
        for w in rest:
            if w == "dq":
                kwargs["double_quant"] = True
            elif w.startswith("b") and w[1:].isdigit():
                kwargs["block_size"] = int(w[1:])
            elif w in COMPUTE_DTYPES:
                kwargs["compute_dtype"] = w
            else:
                raise LowbitError(f"unrecognised word {w!r} in {cls.name} method name "
                                  "(expected dq, bN for the block size, or bf16/fp16/fp32)")
        return cls(**kwargs)


@register_method
@dataclass(frozen=True)
class FP4(NF4):
    """bitsandbytes' FP4 (E2M1 with its own code order), same layout and options as NF4."""

    name = "fp4"
    quant_type: ClassVar[str] = "fp4"
