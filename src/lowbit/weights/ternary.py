"""Ternary weights: codes in {-1, 0, +1} times one scale per tensor (BitNet b1.58's weights).

Source: Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", eq. 1-3:
W~ = RoundClip(W / (gamma + eps), -1, 1) with gamma = mean |W| (the absmean scale); the weight the layer
multiplies is gamma * W~. methods/bitnet.py chooses the codes, nn/ternary.py runs them, io/gguf.py writes
them as llama.cpp's TQ1_0 / TQ2_0 blocks (weights/ggml/ternary.py translates, bit for bit).

Storage (`packing`): "trit5" five codes per byte in TQ1_0's byte encoding (core.packing.pack_trits, 1.6 bits
per weight) or "2bit" four codes per byte (code + 1 in two bits, core.packing.pack_bits), plus the scale
as one float16 (2 bytes: what a TQ block stores, so export never re-rounds it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core.quantize import StoredSize
from lowbit.core import pack_bits, pack_trits, packed_nbytes, trit_nbytes, unpack_bits, unpack_trits
from lowbit.errors import LowbitError

PACKINGS = ("trit5", "2bit")
SCALE_BYTES = 2          # the scale is held as one float16


def check_packing(packing: str) -> str:
    if packing not in PACKINGS:
        raise LowbitError(f"unknown ternary packing {packing!r}; known: {', '.join(PACKINGS)}")
    return packing


def packed_size(n: int, packing: str) -> int:
    """Bytes holding n ternary codes in `packing`."""
    return trit_nbytes(n) if check_packing(packing) == "trit5" else packed_nbytes(n, 2)


def pack_ternary(codes: torch.Tensor, packing: str) -> torch.Tensor:
    """Codes {-1, 0, +1} (any shape) -> flat uint8 of packed_size(codes.numel(), packing) bytes."""
    if check_packing(packing) == "trit5":
        return pack_trits(codes)
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise LowbitError("ternary codes must be -1, 0 or +1")
    return pack_bits(codes.to(torch.int64) + 1, 2)


def unpack_ternary(packed: torch.Tensor, n: int, packing: str) -> torch.Tensor:
    """The first n codes, int8 in {-1, 0, +1}."""
    if check_packing(packing) == "trit5":
        return unpack_trits(packed, n)
    return unpack_bits(packed, 2, n).to(torch.int8) - 1


@dataclass
class TernaryWeight(StoredSize):
    """A weight [out, in] = scale * codes, codes in {-1, 0, +1} packed flat (row-major) by `packing`.

    packed: uint8 [packed_size(out * in, packing)]; scale: float16 scalar (the absmean gamma);
    dtype: the dtype dequantize() returns (the float model's)."""

    packed: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    packing: str = "trit5"
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        check_packing(self.packing)
        self.shape = torch.Size(self.shape)
        if len(self.shape) != 2:
            raise LowbitError(f"a ternary weight is 2-D [out, in], got shape {tuple(self.shape)}")
        if self.packed.dtype != torch.uint8 or self.packed.numel() != packed_size(self.numel, self.packing):
            raise LowbitError(f"{self.packing} data for {tuple(self.shape)} must be "
                              f"{packed_size(self.numel, self.packing)} uint8 bytes, got {self.packed.numel()}")
        self.scale = torch.as_tensor(self.scale).reshape(()).to(torch.float16)
        if not torch.isfinite(self.scale):
            raise LowbitError(f"ternary scale {float(self.scale)} does not fit float16")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale, packing: str = "trit5",
                   dtype: torch.dtype = torch.float32) -> "TernaryWeight":
        """codes [out, in] in {-1, 0, +1}; scale: a float (rounded to float16, to nearest)."""
        return cls(pack_ternary(codes, packing), torch.as_tensor(scale, dtype=torch.float32), codes.shape, packing,
                   dtype)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def storage_bits(self) -> int:
        """True size: the packed codes and the float16 scale."""
        return 8 * (self.packed.numel() + SCALE_BYTES)

    def codes(self) -> torch.Tensor:
        """int8 [out, in] in {-1, 0, +1}."""
        return unpack_ternary(self.packed, self.numel, self.packing).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """scale * codes, computed in float32 (exact: codes are 0 or ±1), returned in `dtype`."""
        return (self.codes().float() * self.scale.float()).to(self.dtype)

    def repacked(self, packing: str) -> "TernaryWeight":
        """The same values in another packing (lossless)."""
        return TernaryWeight(pack_ternary(self.codes(), packing), self.scale, self.shape, packing, self.dtype)
