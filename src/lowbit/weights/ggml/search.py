"""The scale searches of llama.cpp's ggml-quants.c, vectorised over leading dims; x [..., n].

make_qx_quants, make_qkx2/3_quants (make_qkx_quants), make_q3_quants and make_qp_quants are vectorised
over all sub-blocks of a chunk of rows; only their short coordinate-descent passes loop over the 16 or
32 elements of a sub-block. The super-block scale functions turn sub-block float scales into integers
times one fp16 scale.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch

from lowbit.weights.ggml.fields import fp16, nearest_int, signed_absmax

GROUP_MAX_EPS = 1e-15

# A compiled implementation of make_qkx/qx/qp/q3_quants (lowbit.kernels.ggml_search), used while set.
# The method and the GGUF exporter set it when the compiled kernels load; the torch code below is the
# reference and the fallback (the two differ only in the order of each sub-block's sums).
_NATIVE: ContextVar = ContextVar("lowbit_ggml_native_searches", default=None)


@contextmanager
def native_searches(impl):
    token = _NATIVE.set(impl)
    try:
        yield
    finally:
        _NATIVE.reset(token)


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _trial_codes(iscale: torch.Tensor, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Codes round(iscale * x) for every trial inverse scale: iscale [B, S], x [B, n] -> [B, S, n]."""
    return torch.mul(iscale.unsqueeze(-1), x.unsqueeze(-2)).round_().clamp_(lo, hi)


def _wsum(codes: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_i codes[b, s, i] * v[b, i] -> [B, S] (a batched mat-vec, without a [B, S, n] temporary)."""
    return torch.bmm(codes, v.unsqueeze(-1)).squeeze(-1)


def _pick(codes: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """codes [B, S, n], best [B] -> [B, n]."""
    return codes[torch.arange(codes.shape[0]), best]


def _lsq_scale(sumlx: torch.Tensor, suml2: torch.Tensor) -> torch.Tensor:
    """sum w x l / sum w l^2, or 0 where sum w l^2 is 0."""
    return torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes l in [-nmax, nmax-1] and scale: 19 trial inverse scales -(nmax + 0.1 k)/max,
    each followed by the weighted least-squares scale; keeps the largest (sum w x l)^2 / sum w l^2.
    w None means w = x^2 (ggml's rmse_type 1). Returns (scale [...], l [..., n])."""
    if (native := _NATIVE.get()) is not None:
        return native.make_qx_quants(x, nmax, w)
    shape, n = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n)
    w = x * x if w is None else w.reshape(-1, n)
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    steps = _f32([0] + list(range(-9, 0)) + list(range(1, 10)))
    iscale = -(nmax + _f32(0.1) * steps) / torch.where(zero, 1.0, mx).unsqueeze(-1)   # [B, 19]
    ls = _trial_codes(iscale, x, -nmax, nmax - 1)
    sumlx, suml2 = _wsum(ls, w * x), _wsum(ls * ls, w)
    score = torch.where(suml2 > 0, sumlx * sumlx / torch.where(suml2 > 0, suml2, 1.0), -1.0)
    score[:, 0] = score[:, 0].clamp(min=0)     # the first trial is kept even when it explains nothing
    best = score.argmax(-1)
    s2, slx = suml2.gather(-1, best[:, None])[:, 0], sumlx.gather(-1, best[:, None])[:, 0]
    scale = _lsq_scale(slx, s2)
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
    if (native := _NATIVE.get()) is not None:
        return native.make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad)
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


def coordinate_descent(x, w, l, lo, hi, sumlx, suml2, need_sl2_positive):
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
    if (native := _NATIVE.get()) is not None:
        return native.make_q3_quants(x, nmax)
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    iscale = -nmax / torch.where(zero, 1.0, mx)
    l = nearest_int(iscale.unsqueeze(-1) * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = (w * x * l).sum(-1), (w * l * l).sum(-1)
    l, sumlx, suml2 = coordinate_descent(x, w, l, -nmax, nmax - 1, sumlx, suml2, need_sl2_positive=False)
    scale = _lsq_scale(sumlx, suml2)
    return torch.where(zero, 0.0, scale), torch.where(zero.unsqueeze(-1), -nmax, l).to(torch.int32)


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative values (sub-block scales or mins) onto 0..nmax with a weighted search of the scale
    (ggml's make_qp_quants). Returns (scale [...], l [..., n])."""
    if (native := _NATIVE.get()) is not None:
        return native.make_qp_quants(x, nmax, w)
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
    l, sumlx, suml2 = coordinate_descent(x, w, l, -(1 << 30), nmax, sumlx, suml2, need_sl2_positive=True)
    scale = _lsq_scale(sumlx, suml2)
    return torch.where(zero, 0.0, scale), torch.where(zero.unsqueeze(-1), 0, l).clamp(min=0).to(torch.int32)


# ----------------------------------------------------------------------------------------------------
# Super-block scales: sub-block float scales -> integers times one fp16 scale
# ----------------------------------------------------------------------------------------------------
def unsigned_superscale_ref(s: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: d = max/nmax, integer = round(s * nmax/max) (Q2_K, Q4_K, Q5_K)."""
    mx = s.amax(-1).clamp(min=0)
    inv = torch.where(mx > 0, nmax / torch.where(mx > 0, mx, 1.0), 0.0)
    ints = nearest_int(inv.unsqueeze(-1) * s).clamp(0, nmax).to(torch.int32)
    return fp16(mx / nmax), ints


def signed_superscale_ref(s: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the signed largest scale maps to -nmax (Q3_K: 32, Q6_K: 128)."""
    mx = signed_absmax(s)
    ok = mx.abs() >= GROUP_MAX_EPS
    iscale = torch.where(ok, -nmax / torch.where(ok, mx, 1.0), 0.0)
    ints = nearest_int(iscale.unsqueeze(-1) * s).clamp(-nmax, nmax - 1).to(torch.int32)
    d = torch.where(ok, 1 / torch.where(ok, iscale, 1.0), 0.0)
    return fp16(d), torch.where(ok.unsqueeze(-1), ints, 0)


def unsigned_superscale_fit(s, nmax, sw):
    """make_qp_quants weighted by each sub-block's total weight (llama.cpp's imatrix path)."""
    d, ints = make_qp_quants(s, nmax, sw)
    return fp16(d), ints


def signed_superscale_fit(s, nmax, sw):
    """make_qx_quants weighted by each sub-block's total weight."""
    d, ints = make_qx_quants(s, nmax, sw)
    return fp16(d), ints
