"""The 32-element ggml block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, one class each.

Codes are [R, nb, 1, 32]. Quantising = choosing the fields:
  search=False  what llama-quantize writes: the `*_ref` algorithms of ggml-quants.c without an importance
                matrix (byte-identical), the `*_impl` algorithms with one;
  search=True   (default) both, plus the impl fields requantized under their stored scales and every
                candidate refitted by least squares; the best per block is kept.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from lowbit.weights.ggml.block import BlockType
from lowbit.weights.ggml.bytes import bits_le, cat, cut, half_bytes, qs32, read_half, u8, unbits_le, unqs32
from lowbit.weights.ggml.fields import Fields, choose, fp16, requantize, round_half_away, signed_absmax
from lowbit.weights.ggml.search import make_qkx_quants, make_qx_quants


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d is 0 (ggml's `d ? 1.0f/d : 0.0f`)."""
    return torch.where(d != 0, 1 / torch.where(d != 0, d, 1.0), 0.0)


def _row_sigma2(x):
    return (x * x).sum((1, 2, 3), keepdim=True) / (x.shape[1] * x.shape[3])


def _impl_weights(x, qw):
    """The weights of llama.cpp's *_impl: importance (or 1) times sqrt(row mean square + x^2)."""
    return (1.0 if qw is None else qw) * torch.sqrt(_row_sigma2(x) + x * x)


class Legacy32(BlockType):
    """A fitted 32-element type: `ref` (llama.cpp without imatrix) and `impl` (with one) fields."""

    nmax: ClassVar[int]

    @classmethod
    def code_range(cls) -> tuple[int, int]:
        raise NotImplementedError

    @classmethod
    def ref(cls, x: torch.Tensor) -> Fields:
        raise NotImplementedError

    @classmethod
    def impl(cls, x: torch.Tensor, qw: torch.Tensor | None) -> Fields:
        raise NotImplementedError

    @classmethod
    def quantize(cls, x, qw, search):
        lo, hi = cls.code_range()
        found = ([cls.ref(x)] if qw is None else []) + ([cls.impl(x, qw)] if qw is not None or search else [])
        if search:
            found.append(requantize(x, found[-1], lo, hi))
        return choose(x, qw, found, lo, hi, search)


class Symmetric32(Legacy32):
    """Q4_0 (nmax 8), Q5_0 (nmax 16): d = signed max / -nmax, codes by truncation as ggml's ref."""

    @classmethod
    def code_range(cls):
        return -cls.nmax, cls.nmax - 1

    @classmethod
    def ref(cls, x):
        nmax, xb = cls.nmax, x[..., 0, :]
        d = signed_absmax(xb) / -nmax
        q = torch.trunc(xb * _inverse(d).unsqueeze(-1) + (nmax + 0.5)).clamp(0, 2 * nmax - 1) - nmax
        return Fields(fp16(d), q.to(torch.int32).unsqueeze(-2))

    @classmethod
    def impl(cls, x, qw):
        d, q = make_qx_quants(x[..., 0, :], cls.nmax, _impl_weights(x, qw)[..., 0, :])
        return Fields(fp16(d), q.unsqueeze(-2))


class Affine32(Legacy32):
    """Q4_1 (nmax 15), Q5_1 (nmax 31): x ~ d*q + min."""

    @classmethod
    def code_range(cls):
        return 0, cls.nmax

    @classmethod
    def ref(cls, x):
        xb = x[..., 0, :]
        mn, mx = xb.amin(-1), xb.amax(-1)
        d = (mx - mn) / cls.nmax
        q = torch.trunc((xb - mn.unsqueeze(-1)) * _inverse(d).unsqueeze(-1) + 0.5).clamp(0, cls.nmax)
        return Fields(fp16(d), q.to(torch.int32).unsqueeze(-2), dmin=-fp16(mn))

    @classmethod
    def impl(cls, x, qw):
        w = _impl_weights(x, qw)
        d, the_min, q = make_qkx_quants(x[..., 0, :], w[..., 0, :], cls.nmax, -0.9, 0.05, 36, False)
        return Fields(fp16(d), q.unsqueeze(-2), dmin=-fp16(-the_min))


class Q4_0(Symmetric32, type_name="Q4_0"):
    """block_q4_0: fp16 d, 16 bytes of 4-bit codes stored +8."""

    nmax = 8

    @classmethod
    def pack(cls, f):
        return cat(half_bytes(f.d), qs32(f.q + 8))

    @classmethod
    def unpack(cls, b):
        d, qs = cut(b, 2, 16)
        return Fields(read_half(d), unqs32(qs) - 8)


class Q4_1(Affine32, type_name="Q4_1"):
    """block_q4_1: fp16 d, fp16 min (= -dmin), 16 bytes of 4-bit codes."""

    nmax = 15

    @classmethod
    def pack(cls, f):
        return cat(half_bytes(f.d), half_bytes(-f.dmin), qs32(f.q))

    @classmethod
    def unpack(cls, b):
        d, m, qs = cut(b, 2, 2, 16)
        return Fields(read_half(d), unqs32(qs), dmin=-read_half(m))


class Q5_0(Symmetric32, type_name="Q5_0"):
    """block_q5_0: fp16 d, 4 bytes of fifth bits, 16 bytes of low nibbles; codes stored +16."""

    nmax = 16

    @classmethod
    def pack(cls, f):
        q = f.q + 16
        return cat(half_bytes(f.d), bits_le(q[..., 0, :] >> 4), qs32(q))

    @classmethod
    def unpack(cls, b):
        d, qh, qs = cut(b, 2, 4, 16)
        return Fields(read_half(d), unqs32(qs) + (unbits_le(qh) << 4).unsqueeze(-2) - 16)


class Q5_1(Affine32, type_name="Q5_1"):
    """block_q5_1: fp16 d, fp16 min (= -dmin), 4 bytes of fifth bits, 16 bytes of low nibbles."""

    nmax = 31

    @classmethod
    def pack(cls, f):
        return cat(half_bytes(f.d), half_bytes(-f.dmin), bits_le(f.q[..., 0, :] >> 4), qs32(f.q))

    @classmethod
    def unpack(cls, b):
        d, m, qh, qs = cut(b, 2, 2, 4, 16)
        return Fields(read_half(d), unqs32(qs) + (unbits_le(qh) << 4).unsqueeze(-2), dmin=-read_half(m))


class Q8_0(BlockType, type_name="Q8_0"):
    """block_q8_0: fp16 d = amax/127, 32 int8 codes rounded half away from zero (quantize_row_q8_0_ref).
    llama.cpp uses no importance for it and there is nothing to search: one answer for every mode."""

    @classmethod
    def quantize(cls, x, qw, search):
        xb = x[..., 0, :]
        d = xb.abs().amax(-1) / 127
        return Fields(fp16(d), round_half_away(xb * _inverse(d).unsqueeze(-1)).to(torch.int32).unsqueeze(-2))

    @classmethod
    def pack(cls, f):
        return cat(half_bytes(f.d), u8(f.q[..., 0, :] & 0xFF))

    @classmethod
    def unpack(cls, b):
        d, qs = cut(b, 2, 32)
        return Fields(read_half(d), qs.view(torch.int8).to(torch.int32).unsqueeze(-2))
