"""llama.cpp's ggml block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q2_K .. Q6_K.

Every block type is described once as *fields* (`Fields`: a super-block scale d, optional min dmin,
integer sub-block scales and mins, integer codes q) and a *byte layout* (pack/unpack, the structs of
ggml-common.h). A block dequantises to  (d * sc) * q - (dmin * m),  computed in float32 in exactly the
order gguf-py and ggml use, so our values equal theirs bit for bit.

Quantising = choosing the fields. Two modes:
  search=False  what llama-quantize writes: the `*_ref` algorithms of ggml-quants.c without an importance
                matrix (byte-identical for the 32-blocks; float-order close for the k-quants), the
                `*_impl` algorithms with one;
  search=True   (default) both algorithm families plus a least-squares refit of the super-block scales,
                and keep, per super-block, whichever reconstructs the weights best (importance-weighted
                when an imatrix is given). A superset of llama.cpp's candidates, so never worse per block
                under the error it is measured by.
The scale/min searches (make_qx_quants, make_qkx2/3_quants, make_q3_quants, make_qp_quants) are
vectorised over all sub-blocks of a chunk of rows; only their short coordinate-descent passes loop over
the 16 or 32 elements of a sub-block.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from lowbit.errors import LowbitError

QK_K = 256
GROUP_MAX_EPS = 1e-15
# Rows per chunk are chosen so that a chunk holds about this many weights: the candidate searches
# materialise [weights x candidates] tensors, so this bounds memory at a few hundred MB.
CHUNK_ELEMENTS = 1 << 18


# ----------------------------------------------------------------------------------------------------
# Fields: the decoded content of a tensor's blocks, shaped [rows, blocks per row, ...]
# ----------------------------------------------------------------------------------------------------
@dataclass
class Fields:
    d: torch.Tensor                   # [R, nb] float32, fp16-representable
    q: torch.Tensor                   # [R, nb, nsub, sub] int32 codes as they multiply the scale (signed or not)
    sc: torch.Tensor | None = None    # [R, nb, nsub] int32 sub-block scales (None: 1)
    dmin: torch.Tensor | None = None  # [R, nb] float32 (None: no offset)
    m: torch.Tensor | None = None     # [R, nb, nsub] int32 sub-block mins (None: 1)

    def scales(self) -> torch.Tensor:
        """Effective float scale of each sub-block, d * sc, as ggml computes it."""
        d = self.d.unsqueeze(-1)
        return d if self.sc is None else d * self.sc.float()

    def offsets(self) -> torch.Tensor | None:
        if self.dmin is None:
            return None
        dmin = self.dmin.unsqueeze(-1)
        return dmin if self.m is None else dmin * self.m.float()

    def values(self) -> torch.Tensor:
        v = self.scales().unsqueeze(-1) * self.q.float()
        off = self.offsets()
        return v if off is None else v - off.unsqueeze(-1)


def _select(fields: list[Fields], index: torch.Tensor) -> Fields:
    """Per super-block choice among candidates: index [R, nb] picks fields[index]."""
    def pick(name):
        parts = [getattr(f, name) for f in fields]
        if parts[0] is None:
            return None
        stacked = torch.stack(parts)
        idx = index.reshape(1, *index.shape, *([1] * (stacked.dim() - 3))).expand(1, *stacked.shape[1:])
        return stacked.gather(0, idx)[0]
    return Fields(*(pick(n) for n in ("d", "q", "sc", "dmin", "m")))


def _block_error(x: torch.Tensor, f: Fields, ew: torch.Tensor | None) -> torch.Tensor:
    err = (f.values() - x) ** 2
    if ew is not None:
        err = err * ew
    return err.sum((-1, -2), dtype=torch.float64)


def best_of(x: torch.Tensor, ew: torch.Tensor | None, candidates: list[Fields]) -> Fields:
    """Per super-block, the candidate with the lowest (weighted) squared error; ties go to the first."""
    if len(candidates) == 1:
        return candidates[0]
    errors = torch.stack([_block_error(x, f, ew) for f in candidates])
    errors = torch.where(torch.isfinite(errors), errors, torch.inf)   # an fp16 overflow never wins
    return _select(candidates, errors.argmin(0))


# ----------------------------------------------------------------------------------------------------
# Rounding as ggml does it, in float32
# ----------------------------------------------------------------------------------------------------
def nearest_int(t: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (the 1.5*2^23 trick): round half to even on float32."""
    return torch.round(t)


def round_half_away(t: torch.Tensor) -> torch.Tensor:
    """C's roundf. t - trunc(t) is exact in float32, so this has no double-rounding step."""
    whole = torch.trunc(t)
    return whole + torch.trunc(2 * (t - whole))


def fp16(t: torch.Tensor) -> torch.Tensor:
    """The float32 value of t stored as ggml_half (round to nearest even)."""
    return t.to(torch.float16).float()


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude, with its sign (first one on ties, as ggml's strict '>')."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# The scale searches of ggml-quants.c, vectorised over leading dims; x [..., n]
# ----------------------------------------------------------------------------------------------------
def _trial_codes(iscale: torch.Tensor, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Codes round(iscale * x) for every trial inverse scale: iscale [B, S], x [B, n] -> [B, S, n]."""
    return torch.mul(iscale.unsqueeze(-1), x.unsqueeze(-2)).round_().clamp_(lo, hi)


def _wsum(codes: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_i codes[b, s, i] * v[b, i] -> [B, S] (a batched mat-vec, without a [B, S, n] temporary)."""
    return torch.bmm(codes, v.unsqueeze(-1)).squeeze(-1)


def _pick(codes: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """codes [B, S, n], best [B] -> [B, n]."""
    return codes[torch.arange(codes.shape[0]), best]


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes l in [-nmax, nmax-1] and scale: 19 trial inverse scales -(nmax + 0.1 k)/max,
    each followed by the weighted least-squares scale; keeps the largest (sum w x l)^2 / sum w l^2.
    w None means w = x^2 (ggml's rmse_type 1). Returns (scale [...], l [..., n])."""
    shape, n = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n)
    w = x * x if w is None else w.reshape(-1, n)
    mx = _signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    steps = _f32([0] + list(range(-9, 0)) + list(range(1, 10)))
    iscale = -(nmax + _f32(0.1) * steps) / torch.where(zero, 1.0, mx).unsqueeze(-1)   # [B, 19]
    ls = _trial_codes(iscale, x, -nmax, nmax - 1)
    sumlx, suml2 = _wsum(ls, w * x), _wsum(ls * ls, w)
    score = torch.where(suml2 > 0, sumlx * sumlx / torch.where(suml2 > 0, suml2, 1.0), -1.0)
    score[:, 0] = score[:, 0].clamp(min=0)     # the first trial is kept even when it explains nothing
    best = score.argmax(-1)
    s2, slx = suml2.gather(-1, best[:, None])[:, 0], sumlx.gather(-1, best[:, None])[:, 0]
    scale = torch.where(s2 > 0, slx / torch.where(s2 > 0, s2, 1.0), 0.0)
    l = torch.where(zero.unsqueeze(-1), -nmax, _pick(ls, best)).to(torch.int32)
    return torch.where(zero, 0.0, scale).reshape(shape), l.reshape(*shape, n)


def make_qkx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine codes l in [0, nmax] with x ~ scale*l - the_min (ggml's make_qkx2/qkx3_quants): start from
    min-max codes, then try inverse scales (nmax + rmin + rdelta*k)/(max - min) for k = 0..nstep, each
    followed by a weighted least-squares fit of (scale, min), keeping a trial when its weighted squared
    (or absolute) error is lower. As in ggml, `min` moves to the best fit so far, so the later trials are
    taken around it: the trials run in order, each vectorised over all sub-blocks.
    Returns (scale [...], the_min [...] >= 0, l [..., n])."""
    shape, n = x.shape[:-1], x.shape[-1]
    x, w = x.reshape(-1, n), w.reshape(-1, n)

    def error(scale, minv, l):
        diff = scale.unsqueeze(-1) * l + minv.unsqueeze(-1) - x
        return (w * (diff.abs() if use_mad else diff * diff)).sum(-1)

    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1)
    flat = mx == mn
    sum_w, wx = w.sum(-1), w * x
    sum_x = wx.sum(-1)
    iscale = nmax / torch.where(flat, 1.0, mx - mn)
    scale = 1 / iscale
    l = nearest_int(iscale.unsqueeze(-1) * (x - mn.unsqueeze(-1))).clamp(0, nmax)
    best = error(scale, mn, l)
    for k in range(nstep + 1):
        span = mx - mn
        trial = nearest_int(((_f32(rmin) + _f32(rdelta) * k) + nmax) / torch.where(span > 0, span, 1.0)
                            .unsqueeze(-1) * (x - mn.unsqueeze(-1))).clamp(0, nmax)
        wl = w * trial
        sum_l, sum_l2, sum_xl = wl.sum(-1), (wl * trial).sum(-1), (wl * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = (det > 0) & (span > 0)
        det = torch.where(ok, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = this_min > 0      # a positive min is not representable: refit the scale alone
        this_scale = torch.where(clipped, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_min = torch.where(clipped, 0.0, this_min)
        cur = error(this_scale, this_min, trial)
        take = ok & (cur < best)
        l = torch.where(take.unsqueeze(-1), trial, l)
        best, scale = torch.where(take, cur, best), torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    scale = torch.where(flat, 0.0, scale)
    l = torch.where(flat.unsqueeze(-1), 0.0, l).to(torch.int32)
    return scale.reshape(shape), (-mn).reshape(shape), l.reshape(*shape, n)


def _coordinate_descent(x, w, l, lo, hi, sumlx, suml2, need_sl2_positive):
    """Up to five passes that move one code at a time to the value that maximises (sum w x l)^2 / sum w l^2
    (make_q3_quants / make_qp_quants). Loops over the n elements; vectorised over everything else."""
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[-1]):
            xi, wi, li = x[..., i], w[..., i], l[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if need_sl2_positive else slx > 0
            new_l = nearest_int(xi * sl2 / torch.where(ok, slx, 1.0)).clamp(lo, hi)
            nslx, nsl2 = slx + wi * xi * new_l, sl2 + wi * new_l * new_l
            better = ok & (new_l != li) & (nsl2 > 0) & (nslx * nslx * suml2 > sumlx * sumlx * nsl2)
            l[..., i] = torch.where(better, new_l, li)
            sumlx, suml2 = torch.where(better, nslx, sumlx), torch.where(better, nsl2, suml2)
            changed |= better
        if not changed.any():
            break
    return l, sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's reference sub-block fit: codes from -nmax/max, then coordinate descent with weights x^2."""
    mx = _signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    iscale = -nmax / torch.where(zero, 1.0, mx)
    l = nearest_int(iscale.unsqueeze(-1) * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = (w * x * l).sum(-1), (w * l * l).sum(-1)
    l, sumlx, suml2 = _coordinate_descent(x, w, l, -nmax, nmax - 1, sumlx, suml2, need_sl2_positive=False)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero.unsqueeze(-1), -nmax, l).to(torch.int32)


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative values (sub-block scales or mins) onto 0..nmax with a weighted search of the scale
    (ggml's make_qp_quants). Returns (scale [...], l [..., n])."""
    mx = x.amax(-1).clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)
    steps = _f32([0, -4, -3, -2, -1, 1, 2, 3, 4])
    iscale = (_f32(0.1) * steps + nmax) / mx.unsqueeze(-1)                       # [..., 9]
    ls = nearest_int(iscale.unsqueeze(-1) * x.unsqueeze(-2)).clamp(max=nmax)
    diff = x.unsqueeze(-2) - (1 / iscale).unsqueeze(-1) * ls
    mse = (w.unsqueeze(-2) * diff * diff).sum(-1)
    best = mse.argmin(-1, keepdim=True)
    l = ls.gather(-2, best.unsqueeze(-1).expand(*best.shape, x.shape[-1])).squeeze(-2)
    sumlx, suml2 = (w * x * l).sum(-1), (w * l * l).sum(-1)
    l, sumlx, suml2 = _coordinate_descent(x, w, l, -(1 << 30), nmax, sumlx, suml2, need_sl2_positive=True)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero.unsqueeze(-1), 0, l).clamp(min=0).to(torch.int32)


# ----------------------------------------------------------------------------------------------------
# Super-block scales: sub-block float scales -> integers times one fp16 scale
# ----------------------------------------------------------------------------------------------------
def _unsigned_superscale_ref(s: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: d = max/nmax, integer = round(s * nmax/max) (Q2_K, Q4_K, Q5_K)."""
    mx = s.amax(-1).clamp(min=0)
    inv = torch.where(mx > 0, nmax / torch.where(mx > 0, mx, 1.0), 0.0)
    ints = nearest_int(inv.unsqueeze(-1) * s).clamp(0, nmax).to(torch.int32)
    return fp16(mx / nmax), ints


def _signed_superscale_ref(s: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the signed largest scale maps to -nmax (Q3_K: 32, Q6_K: 128)."""
    mx = _signed_absmax(s)
    ok = mx.abs() >= GROUP_MAX_EPS
    iscale = torch.where(ok, -nmax / torch.where(ok, mx, 1.0), 0.0)
    ints = nearest_int(iscale.unsqueeze(-1) * s).clamp(-nmax, nmax - 1).to(torch.int32)
    d = torch.where(ok, 1 / torch.where(ok, iscale, 1.0), 0.0)
    return fp16(d), torch.where(ok.unsqueeze(-1), ints, 0)


def _unsigned_superscale_fit(s, nmax, sw):
    d, ints = make_qp_quants(s, nmax, sw)
    return fp16(d), ints


def _signed_superscale_fit(s, nmax, sw):
    d, ints = make_qx_quants(s, nmax, sw)
    return fp16(d), ints


# ----------------------------------------------------------------------------------------------------
# Final codes from the stored (fp16) scales, and the least-squares refit of d (and dmin)
# ----------------------------------------------------------------------------------------------------
def requantize(x: torch.Tensor, f: Fields, lo: int, hi: int) -> Fields:
    """Codes for x under f's stored scales: round((x + offset) / scale); sub-blocks whose scale is zero
    keep their codes (as ggml does: their values are the offset either way)."""
    scale = f.scales().unsqueeze(-1)
    off = f.offsets()
    num = x if off is None else x + off.unsqueeze(-1)
    live = scale != 0
    q = nearest_int(num / torch.where(live, scale, 1.0)).clamp(lo, hi).to(torch.int32)
    return replace(f, q=torch.where(live, q, f.q))


def refit(x: torch.Tensor, ew: torch.Tensor | None, f: Fields, lo: int, hi: int) -> Fields:
    """Given the integer codes and sub-block integers, the (weighted) least-squares d (and dmin) of the
    whole super-block, stored as fp16, then codes recomputed under them."""
    w = torch.ones_like(x) if ew is None else ew
    a = f.q.float() * (1.0 if f.sc is None else f.sc.float().unsqueeze(-1))      # x ~ d*a - dmin*b
    saa, sax = (w * a * a).sum((-1, -2)), (w * a * x).sum((-1, -2))
    if f.dmin is None:
        ok = saa > 0
        d = torch.where(ok, sax / torch.where(ok, saa, 1.0), f.d)
        return requantize(x, replace(f, d=fp16(d)), lo, hi)
    b = torch.ones_like(x) if f.m is None else f.m.float().unsqueeze(-1).expand_as(x)
    sbb, sab, sbx = (w * b * b).sum((-1, -2)), (w * a * b).sum((-1, -2)), (w * b * x).sum((-1, -2))
    det = saa * sbb - sab * sab
    ok = det > 0
    det = torch.where(ok, det, 1.0)
    d = (sax * sbb - sab * sbx) / det
    dmin = (sax * sab - saa * sbx) / det
    keep_sign = (d >= 0) & ((dmin >= 0) | (f.m is None))
    ok = ok & keep_sign
    f2 = replace(f, d=fp16(torch.where(ok, d, f.d)), dmin=fp16(torch.where(ok, dmin, f.dmin)))
    return requantize(x, f2, lo, hi)


# ----------------------------------------------------------------------------------------------------
# Byte layouts (ggml-common.h): small bit-plumbing helpers shared by the types
# ----------------------------------------------------------------------------------------------------
def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8)


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    """[...] float32 -> [..., 2] little-endian fp16 bytes."""
    return t.to(torch.float16).unsqueeze(-1).contiguous().view(torch.uint8)


def _read_half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return _u8((lo & 0xF) | ((hi & 0xF) << 4))


def _split_nibbles(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    return b & 0xF, b >> 4


def _planes(values: torch.Tensor, width: int) -> torch.Tensor:
    """[..., k, 32] small ints -> [..., 32] bytes: row j shifted left by width*j (k*width <= 8)."""
    shifts = torch.arange(values.shape[-2], dtype=torch.int32).unsqueeze(-1) * width
    return _u8((values.to(torch.int32) << shifts).sum(-2))


def _unplanes(b: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """Inverse of _planes: [..., 32] bytes -> [..., k, 32]."""
    shifts = torch.arange(k, dtype=torch.int32).unsqueeze(-1) * width
    return (b.to(torch.int32).unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _cat(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.reshape(*p.shape[:2], -1) for p in parts], -1)


def _cut(b: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    return list(torch.split(b, list(sizes), dim=-1))


# ---- 32-element blocks: codes [R, nb, 1, 32]; q holds element j and j+16 in one byte
def _qs32(q: torch.Tensor) -> torch.Tensor:
    q = q[..., 0, :]
    return _nibbles(q[..., :16], q[..., 16:])


def _unqs32(b: torch.Tensor) -> torch.Tensor:
    lo, hi = _split_nibbles(b)
    return torch.cat([lo, hi], -1).unsqueeze(-2)


def _bits_le(bits: torch.Tensor) -> torch.Tensor:
    """[..., 8k] 0/1 -> [..., k] bytes, element i in byte i//8 bit i%8."""
    grouped = bits.to(torch.int32).reshape(*bits.shape[:-1], -1, 8)
    return _u8((grouped << torch.arange(8, dtype=torch.int32)).sum(-1))


def _unbits_le(b: torch.Tensor) -> torch.Tensor:
    return ((b.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).flatten(-2)


def _pack_q8_0(f):
    return _cat(_half_bytes(f.d), _u8(f.q[..., 0, :] & 0xFF))


def _unpack_q8_0(b):
    d, qs = _cut(b, 2, 32)
    return Fields(_read_half(d), qs.view(torch.int8).to(torch.int32).unsqueeze(-2))


def _pack_q4_0(f):
    return _cat(_half_bytes(f.d), _qs32(f.q + 8))


def _unpack_q4_0(b):
    d, qs = _cut(b, 2, 16)
    return Fields(_read_half(d), _unqs32(qs) - 8)


def _pack_q4_1(f):
    return _cat(_half_bytes(f.d), _half_bytes(-f.dmin), _qs32(f.q))


def _unpack_q4_1(b):
    d, m, qs = _cut(b, 2, 2, 16)
    return Fields(_read_half(d), _unqs32(qs), dmin=-_read_half(m))


def _pack_q5_0(f):
    q = f.q + 16
    return _cat(_half_bytes(f.d), _bits_le(q[..., 0, :] >> 4), _qs32(q))


def _unpack_q5_0(b):
    d, qh, qs = _cut(b, 2, 4, 16)
    return Fields(_read_half(d), _unqs32(qs) + (_unbits_le(qh) << 4).unsqueeze(-2) - 16)


def _pack_q5_1(f):
    return _cat(_half_bytes(f.d), _half_bytes(-f.dmin), _bits_le(f.q[..., 0, :] >> 4), _qs32(f.q))


def _unpack_q5_1(b):
    d, m, qh, qs = _cut(b, 2, 2, 4, 16)
    return Fields(_read_half(d), _unqs32(qs) + (_unbits_le(qh) << 4).unsqueeze(-2), dmin=-_read_half(m))


# ---- k-quants: the 256 codes as [..., 256]
def _flat(q: torch.Tensor) -> torch.Tensor:
    return q.reshape(*q.shape[:2], QK_K)


def _crumbs(codes: torch.Tensor) -> torch.Tensor:
    """2-bit codes [..., 256] -> 64 bytes: per 128-half, byte l holds elements l, l+32, l+64, l+96."""
    return _planes(codes.reshape(*codes.shape[:-1], 2, 4, 32), 2).flatten(-2)


def _uncrumbs(b: torch.Tensor) -> torch.Tensor:
    return _unplanes(b.reshape(*b.shape[:-1], 2, 32), 4, 2).flatten(-3)


def _bitplane32(bits: torch.Tensor) -> torch.Tensor:
    """One bit per code [..., 256] -> 32 bytes: element 32j + l is bit j of byte l (Q3_K hmask, Q5_K qh)."""
    return _planes(bits.reshape(*bits.shape[:-1], 8, 32), 1)


def _unbitplane32(b: torch.Tensor) -> torch.Tensor:
    return _unplanes(b, 8, 1).flatten(-2)


def _pack_k4_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit (scale, min) pairs in 12 bytes (Q4_K, Q5_K)."""
    lo_s, hi_s, lo_m, hi_m = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    return torch.cat([_u8(lo_s | ((hi_s >> 4) << 6)), _u8(lo_m | ((hi_m >> 4) << 6)), _nibbles(hi_s, hi_m)], -1)


def _unpack_k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    a, c, e = b[..., :4], b[..., 4:8], b[..., 8:]
    sc = torch.cat([a & 63, (e & 0xF) | ((a >> 6) << 4)], -1)
    m = torch.cat([c & 63, (e >> 4) | ((c >> 6) << 4)], -1)
    return sc, m


def _pack_q2_k(f):
    return _cat(_nibbles(f.sc, f.m), _crumbs(_flat(f.q)), _half_bytes(f.d), _half_bytes(f.dmin))


def _unpack_q2_k(b):
    sc, qs, d, dmin = _cut(b, 16, 64, 2, 2)
    s, m = _split_nibbles(sc)
    return Fields(_read_half(d), _uncrumbs(qs).reshape(*b.shape[:2], 16, 16), s, _read_half(dmin), m)


def _pack_q3_scales(ints: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit scales (stored +32): low nibbles pairwise, high 2 bits four to a byte."""
    u = ints + 32
    high = (u >> 4).reshape(*u.shape[:-1], 4, 4)                                # [.., group j//4, j%4]
    return torch.cat([_nibbles(u[..., :8], u[..., 8:]), _u8((high << (2 * torch.arange(4)).unsqueeze(-1)).sum(-2))], -1)


def _unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    lo_a, lo_b = _split_nibbles(b[..., :8])
    high = (b[..., 8:].to(torch.int32).unsqueeze(-2) >> (2 * torch.arange(4)).unsqueeze(-1)) & 3
    return (torch.cat([lo_a, lo_b], -1) | (high.flatten(-2) << 4)) - 32


def _pack_q3_k(f):
    u = _flat(f.q) + 4
    return _cat(_bitplane32(u >> 2), _crumbs(u & 3), _pack_q3_scales(f.sc), _half_bytes(f.d))


def _unpack_q3_k(b):
    hmask, qs, scales, d = _cut(b, 32, 64, 12, 2)
    q = _uncrumbs(qs) | (_unbitplane32(hmask) << 2)
    return Fields(_read_half(d), (q - 4).reshape(*b.shape[:2], 16, 16), _unpack_q3_scales(scales))


def _nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[..., 256] -> 128 bytes: per 64-chunk, byte l holds elements l (low) and l+32 (high)."""
    c = codes.reshape(*codes.shape[:-1], 4, 2, 32)
    return _nibbles(c[..., 0, :], c[..., 1, :]).flatten(-2)


def _unnibble_pairs(b: torch.Tensor) -> torch.Tensor:
    lo, hi = _split_nibbles(b.reshape(*b.shape[:-1], 4, 32))
    return torch.stack([lo, hi], -2).flatten(-3)


def _pack_q4_k(f):
    return _cat(_half_bytes(f.d), _half_bytes(f.dmin), _pack_k4_scales(f.sc, f.m), _nibble_pairs(_flat(f.q)))


def _unpack_q4_k(b):
    d, dmin, scales, qs = _cut(b, 2, 2, 12, 128)
    sc, m = _unpack_k4_scales(scales)
    return Fields(_read_half(d), _unnibble_pairs(qs).reshape(*b.shape[:2], 8, 32), sc, _read_half(dmin), m)


def _pack_q5_k(f):
    q = _flat(f.q)
    return _cat(_half_bytes(f.d), _half_bytes(f.dmin), _pack_k4_scales(f.sc, f.m), _bitplane32(q >> 4),
                _nibble_pairs(q))


def _unpack_q5_k(b):
    d, dmin, scales, qh, qs = _cut(b, 2, 2, 12, 32, 128)
    sc, m = _unpack_k4_scales(scales)
    q = _unnibble_pairs(qs) | (_unbitplane32(qh) << 4)
    return Fields(_read_half(d), q.reshape(*b.shape[:2], 8, 32), sc, _read_half(dmin), m)


def _pack_q6_k(f):
    u = (_flat(f.q) + 32).reshape(*f.q.shape[:2], 2, 4, 32)                     # [.., half, quarter, l]
    ql = torch.cat([_nibbles(u[..., 0, :], u[..., 2, :]), _nibbles(u[..., 1, :], u[..., 3, :])], -1)
    qh = _planes(u >> 4, 2)
    return _cat(ql, qh, _u8(f.sc & 0xFF), _half_bytes(f.d))


def _unpack_q6_k(b):
    ql, qh, scales, d = _cut(b, 128, 64, 16, 2)
    a, c = _split_nibbles(ql.reshape(*b.shape[:2], 2, 2, 32))                    # [.., half, 0/1, l]
    low = torch.stack([a[..., 0, :], a[..., 1, :], c[..., 0, :], c[..., 1, :]], -2)
    high = _unplanes(qh.reshape(*b.shape[:2], 2, 32), 4, 2)
    q = (low | (high << 4)) - 32
    return Fields(_read_half(d), q.reshape(*b.shape[:2], 16, 16), scales.view(torch.int8).to(torch.int32))


# ----------------------------------------------------------------------------------------------------
# Quantisers: x [R, nb, nsub, sub] float32, qw (importance, same shape) or None -> Fields
# ----------------------------------------------------------------------------------------------------
def _candidates(x, ew, found: list[Fields], lo: int, hi: int, search: bool) -> Fields:
    """search: each candidate also refitted, then the best per super-block; else the single replica."""
    if not search:
        return found[0]
    pool = [g for f in found for g in (f, refit(x, ew, f, lo, hi))]
    return best_of(x, ew, pool)


def _row_sigma2(x):
    return (x * x).sum((1, 2, 3), keepdim=True) / (x.shape[1] * x.shape[3])


def _quantize_q8_0(x, qw, search):
    xb = x[..., 0, :]
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1.0), 0.0)
    return Fields(fp16(d), round_half_away(xb * inv.unsqueeze(-1)).to(torch.int32).unsqueeze(-2))


def _symmetric32(nmax: int):
    """Q4_0 (nmax 8), Q5_0 (nmax 16): d = signed max / -nmax, codes by truncation as ggml's ref."""
    def ref(x):
        xb = x[..., 0, :]
        d = _signed_absmax(xb) / -nmax
        inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1.0), 0.0)
        q = torch.trunc(xb * inv.unsqueeze(-1) + (nmax + 0.5)).clamp(0, 2 * nmax - 1) - nmax
        return Fields(fp16(d), q.to(torch.int32).unsqueeze(-2))

    def impl(x, qw):
        w = (1.0 if qw is None else qw) * torch.sqrt(_row_sigma2(x) + x * x)
        d, q = make_qx_quants(x[..., 0, :], nmax, w[..., 0, :])
        return Fields(fp16(d), q.unsqueeze(-2))

    def quantize(x, qw, search):
        found = ([ref(x)] if qw is None else []) + ([impl(x, qw)] if qw is not None or search else [])
        if search:
            found.append(requantize(x, found[-1], -nmax, nmax - 1))
        return _candidates(x, qw, found, -nmax, nmax - 1, search)
    return quantize


def _affine32(nmax: int):
    """Q4_1 (nmax 15), Q5_1 (nmax 31): x ~ d*q + min."""
    def ref(x):
        xb = x[..., 0, :]
        mn, mx = xb.amin(-1), xb.amax(-1)
        d = (mx - mn) / nmax
        inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1.0), 0.0)
        q = torch.trunc((xb - mn.unsqueeze(-1)) * inv.unsqueeze(-1) + 0.5).clamp(0, nmax)
        return Fields(fp16(d), q.to(torch.int32).unsqueeze(-2), dmin=-fp16(mn))

    def impl(x, qw):
        w = (1.0 if qw is None else qw) * torch.sqrt(_row_sigma2(x) + x * x)
        d, the_min, q = make_qkx_quants(x[..., 0, :], w[..., 0, :], nmax, -0.9, 0.05, 36, False)
        return Fields(fp16(d), q.unsqueeze(-2), dmin=-fp16(-the_min))

    def quantize(x, qw, search):
        found = ([ref(x)] if qw is None else []) + ([impl(x, qw)] if qw is not None or search else [])
        if search:
            found.append(requantize(x, found[-1], 0, nmax))
        return _candidates(x, qw, found, 0, nmax, search)
    return quantize


def _superblock_sigma2(x, factor):
    return factor * (x * x).sum((-1, -2), keepdim=True) / QK_K


def _plans(fits: dict, search: bool, replica: dict | None = None) -> list[tuple[str, str]]:
    """(sub-block fit, superscale method) pairs to try: all four when searching, else llama.cpp's own
    pairing (`replica`: fit -> superscale; by default each fit with the superscale of the same name)."""
    if search:
        return [(k, s) for k in fits for s in ("ref", "fit")]
    return [(k, (replica or {}).get(k, k)) for k in fits]


def _affine_k(nmax: int, ref_fit: Callable, sigma_factor: float, impl_default_w: Callable):
    """Q2_K, Q4_K, Q5_K: sub-block (scale, min) fits, then integer scales/mins under fp16 d and dmin.
    Fits: 'ref' (llama.cpp without imatrix) and 'fit' (llama.cpp's imatrix path: finer trial grid,
    importance weights). Superscales: 'ref' (linear from the largest) or 'fit' (make_qp_quants weighted
    by each sub-block's total weight)."""
    nmax_s = 15 if nmax == 3 else 63

    def quantize(x, qw, search):
        sigma2 = _superblock_sigma2(x, sigma_factor)
        w_impl = impl_default_w(x, sigma2) if qw is None else qw * torch.sqrt(sigma2 + x * x)
        sw = w_impl.sum(-1)
        fits = {}
        if qw is None or search:
            fits["ref"] = ref_fit(x)
        if qw is not None or search:
            fits["fit"] = make_qkx_quants(x, w_impl, nmax, -0.9, 0.05, 36, False)
        found = []
        for fit, superscale in _plans(fits, search):
            s, mins, q = fits[fit]
            if superscale == "ref":
                (d, sc), (dmin, m) = _unsigned_superscale_ref(s, nmax_s), _unsigned_superscale_ref(mins, nmax_s)
            else:
                (d, sc), (dmin, m) = _unsigned_superscale_fit(s, nmax_s, sw), _unsigned_superscale_fit(mins, nmax_s, sw)
            found.append(requantize(x, Fields(d, q, sc, dmin, m), 0, nmax))
        return _candidates(x, qw, found, 0, nmax, search)
    return quantize


def _q2k_ref_fit(x):
    return make_qkx_quants(x, x.abs(), 3, -0.5, 0.1, 15, True)


def _q4k_ref_fit(x):
    return make_qkx_quants(x, _q45k_default_w(x, None), 15, -1.0, 0.1, 20, False)


def _q5k_ref_fit(x):
    return make_qkx_quants(x, _q45k_default_w(x, None), 31, -0.5, 0.1, 15, False)


def _q45k_default_w(x, sigma2):
    """llama.cpp's weights without an imatrix: rms of the sub-block (ref) or super-block (impl) + |x|."""
    rms = torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1]) if sigma2 is None else torch.sqrt(sigma2)
    return rms + x.abs()


def _q2k_default_w(x, sigma2):
    return torch.sqrt(sigma2 + x * x)


def _symmetric_k(nmax: int, nmax_s: int, ref_fit: Callable, impl_w: Callable, empty_int: int,
                 impl_superscale: str):
    """Q3_K (codes -4..3, 6-bit scales), Q6_K (codes -32..31, int8 scales): x ~ d*sc*q.
    impl_superscale: how llama.cpp's imatrix path turns the sub-block scales into integers."""
    def quantize(x, qw, search):
        w_impl = impl_w(x, qw)
        sw = w_impl.sum(-1)
        fits = {}
        if qw is None or search:
            fits["ref"] = ref_fit(x)
        if qw is not None or search:
            fits["fit"] = make_qx_quants(x, nmax, w_impl)
        found = []
        for fit, superscale in _plans(fits, search, {"fit": impl_superscale}):
            s, q = fits[fit]
            d, sc = _signed_superscale_ref(s, nmax_s) if superscale == "ref" else _signed_superscale_fit(s, nmax_s, sw)
            sc = torch.where((d == 0).unsqueeze(-1), empty_int, sc)
            found.append(requantize(x, Fields(d, q, sc), -nmax, nmax - 1))
        return _candidates(x, qw, found, -nmax, nmax - 1, search)
    return quantize


def _q3k_impl_w(x, qw):
    return x * x if qw is None else qw * torch.sqrt(_superblock_sigma2(x, 2.0) + x * x)


def _q6k_impl_w(x, qw):
    """llama.cpp passes the imatrix itself; without one, our search tries plain least squares."""
    return torch.ones_like(x) if qw is None else qw


def _q6k_ref_fit(x):
    return make_qx_quants(x, 32, None)


# ----------------------------------------------------------------------------------------------------
# The type table
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockType:
    name: str
    type_id: int          # ggml_type
    block_size: int
    type_size: int        # bytes per block
    nsub: int             # sub-blocks per block
    quantize: Callable    # (x [R, nb, nsub, sub], qw | None, search) -> Fields
    pack: Callable        # Fields -> uint8 [R, nb, type_size]
    unpack: Callable      # uint8 [R, nb, type_size] -> Fields

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_0", 2, 32, 18, 1, _symmetric32(8), _pack_q4_0, _unpack_q4_0),
    BlockType("Q4_1", 3, 32, 20, 1, _affine32(15), _pack_q4_1, _unpack_q4_1),
    BlockType("Q5_0", 6, 32, 22, 1, _symmetric32(16), _pack_q5_0, _unpack_q5_0),
    BlockType("Q5_1", 7, 32, 24, 1, _affine32(31), _pack_q5_1, _unpack_q5_1),
    BlockType("Q8_0", 8, 32, 34, 1, _quantize_q8_0, _pack_q8_0, _unpack_q8_0),
    BlockType("Q2_K", 10, QK_K, 84, 16, _affine_k(3, _q2k_ref_fit, 1.0, _q2k_default_w), _pack_q2_k, _unpack_q2_k),
    BlockType("Q3_K", 11, QK_K, 110, 16, _symmetric_k(4, 32, lambda x: make_q3_quants(x, 4), _q3k_impl_w, -32, "fit"),
              _pack_q3_k, _unpack_q3_k),
    BlockType("Q4_K", 12, QK_K, 144, 8, _affine_k(15, _q4k_ref_fit, 2.0, _q45k_default_w), _pack_q4_k, _unpack_q4_k),
    BlockType("Q5_K", 13, QK_K, 176, 8, _affine_k(31, _q5k_ref_fit, 2.0, _q45k_default_w), _pack_q5_k, _unpack_q5_k),
    BlockType("Q6_K", 14, QK_K, 210, 16, _symmetric_k(32, 128, _q6k_ref_fit, _q6k_impl_w, 0, "ref"),
              _pack_q6_k, _unpack_q6_k),
)}

# Unquantised storage types: (ggml_type, torch dtype).
PLAIN_TYPES: dict[str, tuple[int, torch.dtype]] = {
    "F32": (0, torch.float32), "F16": (1, torch.float16), "BF16": (30, torch.bfloat16)}

GGML_TYPE_NAMES: dict[int, str] = {**{t.type_id: n for n, t in BLOCK_TYPES.items()},
                                   **{i: n for n, (i, _) in PLAIN_TYPES.items()}}


def canonical_type(name: str) -> str:
    upper = str(name).upper()
    if upper not in BLOCK_TYPES and upper not in PLAIN_TYPES:
        known = ", ".join(list(BLOCK_TYPES) + list(PLAIN_TYPES))
        raise LowbitError(f"unknown ggml type {name!r}; known: {known}")
    return upper


def block_size(type_name: str) -> int:
    t = canonical_type(type_name)
    return BLOCK_TYPES[t].block_size if t in BLOCK_TYPES else 1


def row_nbytes(type_name: str, cols: int) -> int:
    """Bytes of one row of `cols` weights."""
    t = canonical_type(type_name)
    if t in PLAIN_TYPES:
        return cols * torch.empty(0, dtype=PLAIN_TYPES[t][1]).element_size()
    bt = BLOCK_TYPES[t]
    _check_cols(cols, bt)
    return cols // bt.block_size * bt.type_size


def bits_per_weight(type_name: str) -> float:
    t = canonical_type(type_name)
    return 8 * row_nbytes(t, block_size(t)) / block_size(t)


def _check_cols(cols: int, bt: BlockType) -> None:
    if cols % bt.block_size:
        raise LowbitError(f"{bt.name} needs rows whose length is a multiple of {bt.block_size}; got {cols} columns")


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise LowbitError(f"ggml quantisation takes a 2-D tensor [rows, columns], got "
                          f"{getattr(weight, 'shape', type(weight).__name__)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise LowbitError("weight contains NaN or infinite values")
    return w


def _check_importance(imatrix, cols: int) -> torch.Tensor | None:
    if imatrix is None:
        return None
    qw = torch.as_tensor(imatrix).detach().float().reshape(-1)
    if qw.numel() != cols:
        raise LowbitError(f"importance vector has {qw.numel()} entries for a weight with {cols} columns")
    if not torch.isfinite(qw).all() or (qw < 0).any():
        raise LowbitError("importance vector must be finite and non-negative")
    return qw


def quantize_ggml(weight: torch.Tensor, type_name: str, imatrix=None, search: bool = True) -> np.ndarray:
    """Quantise a 2-D weight [rows, cols] to ggml blocks: uint8 [rows, row_nbytes(type, cols)].

    imatrix: optional importance per column (llama.cpp's imatrix: mean squared input activation).
    search: see the module docstring (False = what llama-quantize writes).
    """
    w = _check_weight(weight)
    t = canonical_type(type_name)
    rows, cols = w.shape
    if t in PLAIN_TYPES:
        return w.to(PLAIN_TYPES[t][1]).contiguous().view(torch.uint8).reshape(rows, -1).numpy().copy()
    bt = BLOCK_TYPES[t]
    _check_cols(cols, bt)
    qw = _check_importance(imatrix, cols)
    nb, sub = cols // bt.block_size, bt.block_size // bt.nsub
    out = np.empty((rows, nb * bt.type_size), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        x = w[r0:r0 + step].reshape(-1, nb, bt.nsub, sub)
        q = None if qw is None else qw.reshape(1, nb, bt.nsub, sub).expand_as(x)
        fields = bt.quantize(x, q, search)
        out[r0:r0 + step] = bt.pack(fields).reshape(x.shape[0], -1).numpy()
    return out


def _as_bytes(data) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    if t.dtype != torch.uint8:
        raise LowbitError(f"ggml data must be uint8 bytes, got {t.dtype}")
    return t


def unpack_ggml(data, type_name: str) -> Fields:
    """The fields of a [rows, row bytes] block tensor (for inspection and tests)."""
    bt = BLOCK_TYPES[canonical_type(type_name)]
    b = _as_bytes(data)
    if b.dim() != 2 or b.shape[1] % bt.type_size:
        raise LowbitError(f"{bt.name} data must be [rows, k*{bt.type_size}] bytes, got {tuple(b.shape)}")
    return bt.unpack(b.reshape(b.shape[0], -1, bt.type_size))


def dequantize_ggml(data, type_name: str, cols: int | None = None) -> torch.Tensor:
    """ggml blocks uint8 [rows, row bytes] -> float32 [rows, cols], the values ggml computes."""
    t = canonical_type(type_name)
    b = _as_bytes(data)
    if b.dim() != 2:
        raise LowbitError(f"ggml data must be 2-D [rows, row bytes], got {tuple(b.shape)}")
    if t in PLAIN_TYPES:
        dtype = PLAIN_TYPES[t][1]
        out = b.contiguous().view(dtype).float()
    else:
        out = unpack_ggml(b, t).values().reshape(b.shape[0], -1)
    if cols is not None and out.shape[1] != cols:
        raise LowbitError(f"{t} data of {b.shape[1]} bytes per row holds {out.shape[1]} weights, expected {cols}")
    return out


# ----------------------------------------------------------------------------------------------------
# The quantised weight and the per-type method config
# ----------------------------------------------------------------------------------------------------
@dataclass
class GGMLTensor:
    """A weight held as ggml blocks: what a GGUF file stores for it, byte for byte."""

    data: torch.Tensor          # uint8 [rows, row bytes]
    type: str                   # "Q4_K", "Q8_0", "F16", ...
    shape: torch.Size           # [rows, cols] of the weight
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def storage_bits(self) -> int:
        return 8 * self.nbytes

    @property
    def bits_per_element(self) -> float:
        return self.storage_bits / self.numel

    def dequantize(self) -> torch.Tensor:
        return dequantize_ggml(self.data, self.type, self.shape[1]).to(self.dtype)


def importance_from_stats(stats) -> torch.Tensor:
    """llama.cpp's imatrix entry of a Linear: the mean squared input activation of each column, which
    is the diagonal of the input Gram matrix the pipeline gathers, divided by the token count."""
    if stats is None or getattr(stats, "xtx", None) is None or not stats.n_tokens:
        raise LowbitError("an importance matrix (imatrix) needs calibration statistics; none were gathered")
    return torch.diagonal(stats.xtx).float() / stats.n_tokens


# llama.cpp's substitutes when a row length does not divide the block (tensor_type_fallback).
FALLBACK_TYPES = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def fit_type(type_name: str, cols: int) -> str:
    """The type llama.cpp would store a row of `cols` weights in when asked for `type_name`."""
    t = canonical_type(type_name)
    if cols % block_size(t):
        t = FALLBACK_TYPES.get(t, t)
        if cols % block_size(t):
            t = "F16"
    return t


def quantize_to_tensor(weight: torch.Tensor, type_name: str, imatrix=None, search: bool = True) -> GGMLTensor:
    data = torch.from_numpy(quantize_ggml(weight, type_name, imatrix, search))
    return GGMLTensor(data, canonical_type(type_name), torch.Size(weight.shape), weight.dtype)


from lowbit.methods.base import MethodConfig, register_method  # noqa: E402  (after the numerics it wraps)


class GGMLConfigMixin:
    """Shared by the per-type and the mix configs: imatrix and search switches, modules, short names."""

    imatrix: bool
    search: bool

    @property
    def required_stats(self) -> tuple[str, ...]:
        return ("hessian",) if self.imatrix else ()

    def make_module(self, qt: GGMLTensor, bias: torch.Tensor | None = None):
        from lowbit.nn.ggml_linear import GGMLLinear
        return GGMLLinear.from_tensor(qt, bias)

    def _suffix(self) -> str:
        return ("-imatrix" if self.imatrix else "") + ("" if self.search else "-ref")

    @staticmethod
    def _switches(words: list[str]) -> dict:
        out = {}
        for word in words:
            if word == "imatrix":
                out["imatrix"] = True
            elif word == "ref":
                out["search"] = False
            else:
                raise LowbitError(f"unrecognised word {word!r} in a ggml method name (expected imatrix or ref)")
        return out


@register_method
@dataclass(frozen=True)
class GGMLQuant(GGMLConfigMixin, MethodConfig):
    """One ggml block type for every weight it is given ('ggml-q4_k', 'ggml-q6_k-imatrix', 'ggml-q4_0-ref').

    imatrix: weight the fit by the mean squared input activation of each column (needs calibration).
    search:  False = llama-quantize's own algorithm; True = its candidates and more, best per block.
    Rows that do not divide the block size fall back as llama.cpp does (Q4_K -> Q5_0, ..., F16).
    """

    name = "ggml"
    type: str = "Q4_K"
    imatrix: bool = False
    search: bool = True

    def __post_init__(self):
        object.__setattr__(self, "type", canonical_type(self.type))

    def quantize_weight(self, weight, stats=None) -> GGMLTensor:
        imatrix = importance_from_stats(stats) if self.imatrix else None
        return quantize_to_tensor(weight, fit_type(self.type, weight.shape[-1]), imatrix, self.search)

    def for_layer(self, name: str, n_layers: int, **model_info) -> "GGMLQuant":
        return self

    def short_name(self) -> str:
        return f"ggml-{self.type.lower()}" + self._suffix()

    @classmethod
    def from_short_name(cls, rest):
        if not rest:
            raise LowbitError("ggml needs a block type, e.g. ggml-q4_k")
        return cls(type=rest[0], **cls._switches(rest[1:]))
