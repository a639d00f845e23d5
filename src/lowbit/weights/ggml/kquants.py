"""The k-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, one class each; super-blocks of 256 weights.

Codes are [R, nb, nsub, sub]. Quantising = choosing the fields, in two steps: sub-block fits (a float
scale, and a min for the affine types, per sub-block), then the super-block scales that store them as
integers under one fp16 d (and dmin). Two modes:
  search=False  what llama-quantize writes: the `*_ref` algorithms of ggml-quants.c without an importance
                matrix (float-order close), the `*_impl` algorithms with one;
  search=True   (default) both fits with both super-block scale methods, each also refitted by least
                squares, and keep, per super-block, whichever reconstructs the weights best
                (importance-weighted when an imatrix is given). A superset of llama.cpp's candidates, so
                never worse per block under the error it is measured by.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from lowbit.weights.ggml.block import QK_K, BlockType
from lowbit.weights.ggml.bytes import (bitplane32, cat, crumbs, cut, flat, half_bytes, nibble_pairs, nibbles,
                                       pack_k4_scales, planes, read_half, split_nibbles, u8, unbitplane32,
                                       uncrumbs, unnibble_pairs, unpack_k4_scales, unplanes)
from lowbit.weights.ggml.fields import Fields, choose, requantize
from lowbit.weights.ggml.search import (make_q3_quants, make_qkx_quants, make_qx_quants, signed_superscale_fit,
                                        signed_superscale_ref, unsigned_superscale_fit, unsigned_superscale_ref)


def _superblock_sigma2(x, factor):
    return factor * (x * x).sum((-1, -2), keepdim=True) / QK_K


def _plans(fits: dict, search: bool, impl_superscale: str) -> list[tuple[str, str]]:
    """(sub-block fit, superscale method) pairs to try: all four when searching, else llama.cpp's own
    pairing ('ref' with 'ref', 'fit' with impl_superscale)."""
    if search:
        return [(k, s) for k in fits for s in ("ref", "fit")]
    return [(k, {"ref": "ref", "fit": impl_superscale}[k]) for k in fits]


class KQuant(BlockType):
    """Fits: 'ref' (llama.cpp without imatrix) and 'fit' (llama.cpp's imatrix path, importance-weighted).
    Superscales: 'ref' (linear from the largest) or 'fit' (a search weighted by each sub-block's total
    weight); impl_superscale is the one llama.cpp's imatrix path uses."""

    nmax: ClassVar[int]                 # codes lie in 0..nmax (affine) or -nmax..nmax-1 (symmetric)
    nmax_s: ClassVar[int]               # the same for the sub-block integer scales
    impl_superscale: ClassVar[str] = "fit"

    @classmethod
    def code_range(cls) -> tuple[int, int]:
        raise NotImplementedError

    @classmethod
    def ref_fit(cls, x: torch.Tensor) -> tuple:
        """Sub-block fits of llama.cpp's reference: (scale, [min,] codes)."""
        raise NotImplementedError

    @classmethod
    def impl_weights(cls, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        """The element weights of llama.cpp's imatrix path (also tried without one when searching)."""
        raise NotImplementedError

    @classmethod
    def impl_fit(cls, x: torch.Tensor, w: torch.Tensor) -> tuple:
        raise NotImplementedError

    @classmethod
    def to_fields(cls, fit: tuple, superscale: str, sw: torch.Tensor) -> Fields:
        """A fit's sub-block scales (and mins) as integers under fp16 d (and dmin), by `superscale`."""
        raise NotImplementedError

    @classmethod
    def quantize(cls, x, qw, search):
        lo, hi = cls.code_range()
        w_impl = cls.impl_weights(x, qw)
        sw = w_impl.sum(-1)
        fits = {}
        if qw is None or search:
            fits["ref"] = cls.ref_fit(x)
        if qw is not None or search:
            fits["fit"] = cls.impl_fit(x, w_impl)
        found = [requantize(x, cls.to_fields(fits[fit], superscale, sw), lo, hi)
                 for fit, superscale in _plans(fits, search, cls.impl_superscale)]
        return choose(x, qw, found, lo, hi, search)


class AffineK(KQuant):
    """Q2_K, Q4_K, Q5_K: sub-block (scale, min) fits, then integer scales/mins under fp16 d and dmin;
    'fit' is make_qkx3 (a finer trial grid than the reference's make_qkx2)."""

    sigma_factor: ClassVar[float]
    ref_grid: ClassVar[tuple[float, float, int]]     # (rmin, rdelta, nstep) of llama.cpp's reference fit

    @classmethod
    def code_range(cls):
        return 0, cls.nmax

    @classmethod
    def ref_fit(cls, x):
        return make_qkx_quants(x, cls.default_weights(x, None), cls.nmax, *cls.ref_grid, False)

    @staticmethod
    def default_weights(x, sigma2):
        """llama.cpp's weights without an imatrix: rms of the sub-block (ref) or super-block (impl) + |x|."""
        rms = torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1]) if sigma2 is None else torch.sqrt(sigma2)
        return rms + x.abs()

    @classmethod
    def impl_weights(cls, x, qw):
        sigma2 = _superblock_sigma2(x, cls.sigma_factor)
        return cls.default_weights(x, sigma2) if qw is None else qw * torch.sqrt(sigma2 + x * x)

    @classmethod
    def impl_fit(cls, x, w):
        return make_qkx_quants(x, w, cls.nmax, -0.9, 0.05, 36, False)

    @classmethod
    def to_fields(cls, fit, superscale, sw):
        s, mins, q = fit
        if superscale == "ref":
            (d, sc), (dmin, m) = unsigned_superscale_ref(s, cls.nmax_s), unsigned_superscale_ref(mins, cls.nmax_s)
        else:
            (d, sc), (dmin, m) = (unsigned_superscale_fit(s, cls.nmax_s, sw),
                                  unsigned_superscale_fit(mins, cls.nmax_s, sw))
        return Fields(d, q, sc, dmin, m)


class SymmetricK(KQuant):
    """Q3_K (codes -4..3, 6-bit scales), Q6_K (codes -32..31, int8 scales): x ~ d*sc*q."""

    empty_int: ClassVar[int]            # the integer scale stored for a super-block whose d is 0

    @classmethod
    def code_range(cls):
        return -cls.nmax, cls.nmax - 1

    @classmethod
    def impl_fit(cls, x, w):
        return make_qx_quants(x, cls.nmax, w)

    @classmethod
    def to_fields(cls, fit, superscale, sw):
        s, q = fit
        if superscale == "ref":
            d, sc = signed_superscale_ref(s, cls.nmax_s)
        else:
            d, sc = signed_superscale_fit(s, cls.nmax_s, sw)
        return Fields(d, q, torch.where((d == 0).unsqueeze(-1), cls.empty_int, sc))


class Q2_K(AffineK, type_name="Q2_K"):
    """block_q2_K: 16 (4-bit scale, 4-bit min) bytes, 64 bytes of 2-bit codes, fp16 d, fp16 dmin."""

    nsub, nmax, nmax_s, sigma_factor = 16, 3, 15, 1.0

    @classmethod
    def ref_fit(cls, x):
        """Weights |x| and the absolute error (make_qkx2 with use_mad)."""
        return make_qkx_quants(x, x.abs(), cls.nmax, -0.5, 0.1, 15, True)

    @staticmethod
    def default_weights(x, sigma2):
        return torch.sqrt(sigma2 + x * x)

    @classmethod
    def pack(cls, f):
        return cat(nibbles(f.sc, f.m), crumbs(flat(f.q)), half_bytes(f.d), half_bytes(f.dmin))

    @classmethod
    def unpack(cls, b):
        sc, qs, d, dmin = cut(b, 16, 64, 2, 2)
        s, m = split_nibbles(sc)
        return Fields(read_half(d), uncrumbs(qs).reshape(*b.shape[:2], 16, 16), s, read_half(dmin), m)


class Q3_K(SymmetricK, type_name="Q3_K"):
    """block_q3_K: 32 bytes of high bits (hmask), 64 bytes of low 2 bits, 12 bytes of 6-bit scales, fp16 d."""

    nsub, nmax, nmax_s, empty_int = 16, 4, 32, -32

    @classmethod
    def ref_fit(cls, x):
        return make_q3_quants(x, cls.nmax)

    @classmethod
    def impl_weights(cls, x, qw):
        return x * x if qw is None else qw * torch.sqrt(_superblock_sigma2(x, 2.0) + x * x)

    @staticmethod
    def pack_scales(ints: torch.Tensor) -> torch.Tensor:
        """Sixteen 6-bit scales (stored +32): low nibbles pairwise, high 2 bits four to a byte."""
        u = ints + 32
        high = (u >> 4).reshape(*u.shape[:-1], 4, 4)                            # [.., group j//4, j%4]
        high_bytes = u8((high << (2 * torch.arange(4)).unsqueeze(-1)).sum(-2))
        return torch.cat([nibbles(u[..., :8], u[..., 8:]), high_bytes], -1)

    @staticmethod
    def unpack_scales(b: torch.Tensor) -> torch.Tensor:
        lo_a, lo_b = split_nibbles(b[..., :8])
        high = (b[..., 8:].to(torch.int32).unsqueeze(-2) >> (2 * torch.arange(4)).unsqueeze(-1)) & 3
        return (torch.cat([lo_a, lo_b], -1) | (high.flatten(-2) << 4)) - 32

    @classmethod
    def pack(cls, f):
        u = flat(f.q) + 4
        return cat(bitplane32(u >> 2), crumbs(u & 3), cls.pack_scales(f.sc), half_bytes(f.d))

    @classmethod
    def unpack(cls, b):
        hmask, qs, scales, d = cut(b, 32, 64, 12, 2)
        q = uncrumbs(qs) | (unbitplane32(hmask) << 2)
        return Fields(read_half(d), (q - 4).reshape(*b.shape[:2], 16, 16), cls.unpack_scales(scales))


class Q4_K(AffineK, type_name="Q4_K"):
    """block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) pairs, 128 bytes of 4-bit codes."""

    nsub, nmax, nmax_s, sigma_factor, ref_grid = 8, 15, 63, 2.0, (-1.0, 0.1, 20)

    @classmethod
    def pack(cls, f):
        return cat(half_bytes(f.d), half_bytes(f.dmin), pack_k4_scales(f.sc, f.m), nibble_pairs(flat(f.q)))

    @classmethod
    def unpack(cls, b):
        d, dmin, scales, qs = cut(b, 2, 2, 12, 128)
        sc, m = unpack_k4_scales(scales)
        return Fields(read_half(d), unnibble_pairs(qs).reshape(*b.shape[:2], 8, 32), sc, read_half(dmin), m)


class Q5_K(AffineK, type_name="Q5_K"):
    """block_q5_K: as Q4_K, plus 32 bytes of fifth bits before the low nibbles."""

    nsub, nmax, nmax_s, sigma_factor, ref_grid = 8, 31, 63, 2.0, (-0.5, 0.1, 15)

    @classmethod
    def pack(cls, f):
        q = flat(f.q)
        return cat(half_bytes(f.d), half_bytes(f.dmin), pack_k4_scales(f.sc, f.m), bitplane32(q >> 4),
                   nibble_pairs(q))

    @classmethod
    def unpack(cls, b):
        d, dmin, scales, qh, qs = cut(b, 2, 2, 12, 32, 128)
        sc, m = unpack_k4_scales(scales)
        q = unnibble_pairs(qs) | (unbitplane32(qh) << 4)
        return Fields(read_half(d), q.reshape(*b.shape[:2], 8, 32), sc, read_half(dmin), m)


class Q6_K(SymmetricK, type_name="Q6_K"):
    """block_q6_K: 128 bytes of low nibbles, 64 bytes of high 2 bits, 16 int8 scales, fp16 d.
    llama.cpp's imatrix path keeps the reference super-block scales (impl_superscale 'ref')."""

    nsub, nmax, nmax_s, empty_int, impl_superscale = 16, 32, 128, 0, "ref"

    @classmethod
    def ref_fit(cls, x):
        return make_qx_quants(x, cls.nmax, None)

    @classmethod
    def impl_weights(cls, x, qw):
        """llama.cpp passes the imatrix itself; without one, our search tries plain least squares."""
        return torch.ones_like(x) if qw is None else qw

    @classmethod
    def pack(cls, f):
        u = (flat(f.q) + 32).reshape(*f.q.shape[:2], 2, 4, 32)                  # [.., half, quarter, l]
        ql = torch.cat([nibbles(u[..., 0, :], u[..., 2, :]), nibbles(u[..., 1, :], u[..., 3, :])], -1)
        qh = planes(u >> 4, 2)
        return cat(ql, qh, u8(f.sc & 0xFF), half_bytes(f.d))

    @classmethod
    def unpack(cls, b):
        ql, qh, scales, d = cut(b, 128, 64, 16, 2)
        a, c = split_nibbles(ql.reshape(*b.shape[:2], 2, 2, 32))                # [.., half, 0/1, l]
        low = torch.stack([a[..., 0, :], a[..., 1, :], c[..., 0, :], c[..., 1, :]], -2)
        high = unplanes(qh.reshape(*b.shape[:2], 2, 32), 4, 2)
        q = (low | (high << 4)) - 32
        return Fields(read_half(d), q.reshape(*b.shape[:2], 16, 16), scales.view(torch.int8).to(torch.int32))
