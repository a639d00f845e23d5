"""Dense bit packing of 1..8-bit codes into bytes.

Layout: a little-endian bit stream. Code i occupies bits [i*b, (i+1)*b) of the stream, lowest bit
first; byte k holds stream bits [8k, 8k+8). So with b=4 the first code is the low nibble of byte 0.
ceil(n*b/8) bytes hold n codes; unused high bits of the last byte are zero.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError

CODES_PER_WORD = 8  # 8 codes of b bits fill exactly b bytes, whatever b is


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"packing takes 1..8 bits per code, got {bits!r}")


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (any shape, values < 2**bits) into a flat uint8 tensor of ceil(n*bits/8) bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise LowbitError(f"codes out of range for {bits}-bit packing")
    n = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8)
    pad = (-n) % CODES_PER_WORD
    words = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, CODES_PER_WORD)
    shifts = torch.arange(CODES_PER_WORD, dtype=torch.int64) * bits
    word = (words << shifts).sum(-1, keepdim=True)  # at most 56 bits: no int64 overflow
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).reshape(-1).to(torch.uint8)
    return out[: packed_nbytes(n, bits)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first n codes of a packed stream, as uint8."""
    _check_bits(bits)
    data = packed.reshape(-1).to(torch.int64)
    if data.numel() < packed_nbytes(n, bits):
        raise LowbitError(f"packed data holds {data.numel()} bytes, {packed_nbytes(n, bits)} needed for {n} codes")
    if bits == 8:
        return data[:n].to(torch.uint8)
    if 8 % bits == 0:
        return _unpack_byte_aligned(packed.reshape(-1).to(torch.uint8), bits, n)
    n_words = (n + CODES_PER_WORD - 1) // CODES_PER_WORD
    need = n_words * bits
    data = torch.nn.functional.pad(data[:need], (0, need - min(need, data.numel())))
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    word = (data.reshape(-1, bits) << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(CODES_PER_WORD, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)


def _unpack_byte_aligned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Fast path for 1, 2 and 4 bits: codes never straddle a byte, so shift within uint8."""
    per_byte = 8 // bits
    nbytes = packed_nbytes(n, bits)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    codes = (packed[:nbytes, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n]


# ---- trits: five ternary digits per byte, in llama.cpp's TQ1_0 encoding (ggml-quants.c, quantize_row_tq1_0_ref)
TRIT_POWERS = (81, 27, 9, 3, 1)
TRITS_PER_BYTE = 5


def trit_bytes(digits: torch.Tensor) -> torch.Tensor:
    """[..., k, n] digits 0..2 (k <= 5) -> [..., n] uint8. The k digits are the leading digits of a 5-digit
    base-3 number v (first digit most significant), stored as ceil(v * 256 / 243): digit i is then read back
    with a multiply and a shift, ((byte * 3^i) mod 256) * 3 >> 8, as ggml's TQ1_0 kernels do (byte_trits)."""
    k = digits.shape[-2]
    powers = torch.tensor(TRIT_POWERS[:k], dtype=torch.int32).unsqueeze(-1)
    v = (digits.to(torch.int32) * powers).sum(-2)
    return ((v * 256 + 242) // 243).to(torch.uint8)


def byte_trits(b: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of trit_bytes: [..., n] uint8 -> [..., k, n] int32 digits 0..2."""
    mult = torch.tensor([3 ** i for i in range(k)], dtype=torch.int32).unsqueeze(-1)
    q = (b.to(torch.int32).unsqueeze(-2) * mult) & 0xFF
    return (q * 3) >> 8


def trit_nbytes(n: int) -> int:
    return -(-n // TRITS_PER_BYTE)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes {-1, 0, +1} (any shape) -> flat uint8 of ceil(n / 5) bytes: codes 5i..5i+4 in byte i
    (1.6 bits per code; the tail is padded with zeros)."""
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (flat.min() < -1 or flat.max() > 1):
        raise LowbitError("ternary codes must be -1, 0 or +1")
    flat = torch.nn.functional.pad(flat + 1, (0, (-flat.numel()) % TRITS_PER_BYTE), value=1)
    return trit_bytes(flat.reshape(-1, TRITS_PER_BYTE).T)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n ternary codes of a pack_trits stream, int8 in {-1, 0, +1}."""
    data = packed.reshape(-1)
    if data.numel() < trit_nbytes(n):
        raise LowbitError(f"packed data holds {data.numel()} bytes, {trit_nbytes(n)} needed for {n} ternary codes")
    digits = byte_trits(data[:trit_nbytes(n)], TRITS_PER_BYTE)
    return (digits.T.reshape(-1)[:n] - 1).to(torch.int8)
