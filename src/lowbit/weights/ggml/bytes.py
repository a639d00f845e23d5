"""Byte layouts (ggml-common.h): small bit-plumbing helpers shared by the block types.

Bytes travel as uint8 tensors [R, nb, ...]; codes as int32. The 32-element types hold codes
[R, nb, 1, 32]; the k-quants are handled as their 256 codes [..., 256].
"""
from __future__ import annotations

import torch


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8)


def half_bytes(t: torch.Tensor) -> torch.Tensor:
    """[...] float32 -> [..., 2] little-endian fp16 bytes."""
    return t.to(torch.float16).unsqueeze(-1).contiguous().view(torch.uint8)


def read_half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return u8((lo & 0xF) | ((hi & 0xF) << 4))


def split_nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    return b & 0xF, b >> 4


def planes(values: torch.Tensor, width: int) -> torch.Tensor:
    """[..., k, 32] small ints -> [..., 32] bytes: row j shifted left by width*j (k*width <= 8)."""
    shifts = torch.arange(values.shape[-2], dtype=torch.int32).unsqueeze(-1) * width
    return u8((values.to(torch.int32) << shifts).sum(-2))


def unplanes(b: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """Inverse of planes: [..., 32] bytes -> [..., k, 32]."""
    shifts = torch.arange(k, dtype=torch.int32).unsqueeze(-1) * width
    return (b.to(torch.int32).unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def cat(*parts: torch.Tensor) -> torch.Tensor:
    """The parts of a block, in order, as one [R, nb, type_size] byte tensor."""
    return torch.cat([p.reshape(*p.shape[:2], -1) for p in parts], -1)


def cut(b: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Inverse of cat: a block's bytes split into parts of these sizes."""
    return list(torch.split(b, list(sizes), dim=-1))


# ---- 32-element blocks: q holds element j and j+16 in one byte; Q5's fifth bits one per bit
def qs32(q: torch.Tensor) -> torch.Tensor:
    q = q[..., 0, :]
    return nibbles(q[..., :16], q[..., 16:])


def unqs32(b: torch.Tensor) -> torch.Tensor:
    lo, hi = split_nibbles(b)
    return torch.cat([lo, hi], -1).unsqueeze(-2)


def bits_le(bits: torch.Tensor) -> torch.Tensor:
    """[..., 8k] 0/1 -> [..., k] bytes, element i in byte i//8 bit i%8."""
    grouped = bits.to(torch.int32).reshape(*bits.shape[:-1], -1, 8)
    return u8((grouped << torch.arange(8, dtype=torch.int32)).sum(-1))


def unbits_le(b: torch.Tensor) -> torch.Tensor:
    return ((b.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).flatten(-2)


# ---- k-quants: the 256 codes as [..., 256]
def flat(q: torch.Tensor) -> torch.Tensor:
    """Codes [R, nb, nsub, sub] -> [R, nb, 256]."""
    return q.reshape(*q.shape[:2], -1)


def crumbs(codes: torch.Tensor) -> torch.Tensor:
    """2-bit codes [..., 256] -> 64 bytes: per 128-half, byte l holds elements l, l+32, l+64, l+96."""
    return planes(codes.reshape(*codes.shape[:-1], 2, 4, 32), 2).flatten(-2)


def uncrumbs(b: torch.Tensor) -> torch.Tensor:
    return unplanes(b.reshape(*b.shape[:-1], 2, 32), 4, 2).flatten(-3)


def bitplane32(bits: torch.Tensor) -> torch.Tensor:
    """One bit per code [..., 256] -> 32 bytes: element 32j + l is bit j of byte l (Q3_K hmask, Q5_K qh)."""
    return planes(bits.reshape(*bits.shape[:-1], 8, 32), 1)


def unbitplane32(b: torch.Tensor) -> torch.Tensor:
    return unplanes(b, 8, 1).flatten(-2)


def nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[..., 256] -> 128 bytes: per 64-chunk, byte l holds elements l (low) and l+32 (high)."""
    c = codes.reshape(*codes.shape[:-1], 4, 2, 32)
    return nibbles(c[..., 0, :], c[..., 1, :]).flatten(-2)


def unnibble_pairs(b: torch.Tensor) -> torch.Tensor:
    lo, hi = split_nibbles(b.reshape(*b.shape[:-1], 4, 32))
    return torch.stack([lo, hi], -2).flatten(-3)


def pack_k4_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit (scale, min) pairs in 12 bytes (Q4_K, Q5_K)."""
    lo_s, hi_s, lo_m, hi_m = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    return torch.cat([u8(lo_s | ((hi_s >> 4) << 6)), u8(lo_m | ((hi_m >> 4) << 6)), nibbles(hi_s, hi_m)], -1)


def unpack_k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    a, c, e = b[..., :4], b[..., 4:8], b[..., 8:]
    sc = torch.cat([a & 63, (e & 0xF) | ((a >> 6) << 4)], -1)
    m = torch.cat([c & 63, (e >> 4) | ((c >> 6) << 4)], -1)
    return sc, m
