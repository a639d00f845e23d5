"""bitsandbytes' 4-bit layout (NF4 / FP4 blocks, optionally double-quantised): the weight type
`Quantized4bit` and its byte layout, as bitsandbytes 0.50 stores it (see ../../shared/formats.md §6).

The tensor is flattened row-major and cut into blocks of `block_size` elements; each block holds 16-level
codes of value / absmax. Two codes share a byte, the FIRST element in the HIGH nibble. Double
quantisation stores the fp32 absmax values as 8-bit codes of the signed "dynamic" map, blockwise (256
absmax per block) after subtracting their mean, with bnb's exact arithmetic: the 8-bit codes come from
its 65536-step lookup grid rather than an exact nearest-value search (the two differ for ~0.2% of values).
How the 4-bit codes are chosen is the method's business (lowbit.methods.nf4).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from lowbit.core.quantize import StoredSize
from lowbit.errors import LowbitError
from lowbit.formats import get_format

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # what bnb accepts (and its kernels assume)
NESTED_BLOCK_SIZE = 256                                   # absmax values per block of the second level
FORMAT_OF = {"nf4": "nf4", "fp4": "bnb_fp4"}              # bnb quant_type -> lowbit code book
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in COMPUTE_DTYPES.items()}
LUT_STEPS = 65536                                         # bnb's CPU grid over [-1, 1] for 8-bit codes


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
# Checks and decoding

def check_quant_type(quant_type: str) -> str:
    if quant_type not in FORMAT_OF:
        raise LowbitError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def check_block_size(block_size: int) -> int:
    if block_size not in BLOCK_SIZES:
        raise LowbitError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))} (bitsandbytes' set), "
                          f"got {block_size!r}")
    return block_size


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
class Quantized4bit(StoredSize):
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


