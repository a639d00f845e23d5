"""HQQ, half-quadratic quantisation (Badri & Shaji, 2023: "Half-Quadratic Quantization of Large Machine
Learning Models", the mobiusml blog post and the `hqq` package). Needs no calibration data.

Each group's range gives a min-max start (scale s = (max - min) / qmax, zero z = -min / s); the scale is
then kept and the zero point is optimised for the sparsity-promoting lp error (p < 1) between W and its
dequantisation. Half-quadratic splitting adds an auxiliary W_e ~ W - dequant(quant(W)) and alternates:

    W_e <- shrink_p(W - W_r, beta)                         (the generalised soft threshold, below)
    z   <- mean over the group of (W_q - (W - W_e) / s)    (the closed-form zero for fixed W_e)
    beta <- kappa * beta

with W_q = clamp(round(W / s + z), 0, qmax), W_r = (W_q - z) s, stopping as soon as the mean |W - W_r|
over the whole tensor stops falling (the reference keeps the zero of the step that saw the error rise;
so does this). Defaults p = 0.7, beta = 10, kappa = 1.01, 20 iterations: the paper's. The hqq package
(0.2.8) takes kappa but never grows beta: kappa = 1 (`hqq-int4-g64-kappa1`) is its schedule, and with it
the result is the package's, group for group (tests/methods/test_hqq_reference.py).

Speed: the same iteration written in grid units. With r = W/s + z - W_q the residual in steps, the update
is z <- z - mean(sign(r) min(|r|, c |r|^(p-1))), c = s^(p-2) / beta, and min(...) = |r| exactly when
|r| <= t = (s^(p-2)/beta)^(1/(2-p)) = 1 / (s beta^(1/(2-p))), so the costly power is only taken for the
few residuals above t (weights clamped off the grid): z <- z - mean(r) elsewhere. W / s is computed once.

`optimize_scale` also refits the scale each step: for fixed W_e, the scale and zero minimising
||(W_q - z) s - (W - W_e)||^2 are the least-squares line through (W_q, W - W_e) (both in closed form).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, QuantSpec, check_tensor, to_blocks
from lowbit.core.qparams import TORCH_FLOAT_DTYPES, round_scale_up, round_zero
from lowbit.errors import LowbitError
from lowbit.methods.base import SchemeMethod, register_method, resolve_scheme

# The reference's guards: a group narrower than this has scale 1 (its inverse would blow up), and the
# inverse scale never exceeds 2e4 (fp16's range).
MIN_RANGE, MAX_INV_SCALE = 1e-4, 2e4


@register_method
@dataclass(frozen=True)
class HQQ(SchemeMethod):
    """scheme: asymmetric integer grid of 1..8 bits (default uint4 g64) with a float zero point (an
    integer zero_dtype becomes fp16: HQQ's zero points are free floats). lp: the norm's p (0 < p <= 1);
    beta: the first step's penalty; kappa: beta's growth per step (>= 1); iters: at most this many steps;
    optimize_scale: refit the scale too (least squares, each step). kappa 1 (`hqq-int4-g64-kappa1`) is
    the hqq package's schedule: its solver (0.2.8) takes kappa but never grows beta. Axis 1 (groups along
    a row, the input dimension: the only layout a QuantizedTensor holds; `hqq_optimize` takes axis 0 too)."""

    name = "hqq"
    default_scheme = "uint4-g64-zfp16"
    words = {"scale": {"optimize_scale": True}, "p": "lp", "it": "iters", "kappa": "kappa"}
    lp: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    optimize_scale: bool = False

    def __post_init__(self):
        # Not SchemeMethod's check: HQQ takes 1-bit grids too.
        scheme = resolve_scheme(self.scheme, self.default_scheme)
        if scheme.symmetric or not scheme.number_format.is_integer:
            raise LowbitError(f"hqq optimises zero points: it needs an asymmetric integer grid (uint1..uint8), "
                              f"not {scheme.format}{'' if scheme.symmetric else ' asymmetric'}")
        if scheme.granularity not in ("group", "channel"):
            raise LowbitError(f"hqq quantises per group or per channel, not per {scheme.granularity}")
        if scheme.zero_dtype == "int":
            scheme = scheme.updated(zero_dtype="fp16")
        object.__setattr__(self, "scheme", scheme)
        if not (isinstance(self.lp, (int, float)) and 0 < self.lp <= 1):
            raise LowbitError(f"hqq's lp must be in (0, 1], got {self.lp!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0 and math.isfinite(self.beta)):
            raise LowbitError(f"hqq's beta must be a positive number, got {self.beta!r}")
        if not (isinstance(self.kappa, (int, float)) and 1 <= self.kappa < math.inf):
            raise LowbitError(f"hqq's kappa must be >= 1, got {self.kappa!r}")
        if not (isinstance(self.iters, int) and self.iters >= 1):
            raise LowbitError(f"hqq's iters must be a positive integer, got {self.iters!r}")

    def quantize_weight(self, weight, stats=None) -> QuantizedTensor:
        return hqq_quantize(weight, self.scheme, self.lp, self.beta, self.kappa, self.iters, self.optimize_scale)


# ---------------------------------------------------------------------------------------------------
# The operators

def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft-thresholding operator, argmin_y |y|^p + beta/2 (y - x)^2 in the paper's
    approximation: sign(x) max(|x| - |x|^(p-1) / beta, 0). p = 1 is the soft threshold (|x| - 1/beta)+.
    Written as the reference writes it, |x| - (1/beta) |x|^(p-1), so that both round alike: a zero one ulp
    apart sends a later step's codes apart."""
    a = x.abs()
    return torch.sign(x) * (a - (1.0 / beta) * a.pow(p - 1)).clamp_min(0.0)


def minmax_start(blocks: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse scale, zero), each [..., 1], mapping each block's [min, max] onto [0, qmax]: the
    reference's start, with its guards (a range below MIN_RANGE gets inverse scale 1)."""
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    rng = hi - lo
    inv = torch.where(rng.abs() <= MIN_RANGE, torch.ones_like(rng), qmax / rng).clamp(max=MAX_INV_SCALE)
    return inv, -lo * inv


def _block_mean(t: torch.Tensor, columns: bool) -> torch.Tensor:
    """Each block's (row's) mean [G, 1]; columns: summed in the order of the reference, which holds axis-0
    blocks as the columns of a [n, G] tensor (a zero one ulp apart sends a later step's codes apart)."""
    return t.T.contiguous().mean(0, keepdim=True).T if columns else t.mean(-1, keepdim=True)


def _zero_step(w: torch.Tensor, x: torch.Tensor, inv: torch.Tensor, z: torch.Tensor, qmax: int, beta: float,
               p: float, x_range: tuple, q: torch.Tensor, d: torch.Tensor, columns: bool = False):
    """One half-quadratic step on blocks w [G, n] (x = w * inv, x_range its per-block (min, max)) for the
    zero point. Returns (the new zero, the mean |W - W_r| over all blocks, computed as the reference
    computes it, whose early stop it decides); the codes W_q are left in `q` ([G, n] scratch, as is `d`).

    The new zero is computed as the reference computes it, mean(W_q - (W - W_e) inv), which is
    mean(W_q - x) wherever W_e = 0, i.e. wherever the residual |r| <= t (module docstring). A residual
    exceeds 1/2 only where the grid clamps, at the block's min or max, so the blocks that may hold one
    are known from x_range without a pass over the elements; those get the full formula."""
    torch.add(x, z, out=q).round_().clamp_(0, qmax)
    torch.sub(q, x, out=d)                              # z - r, r the residual in steps
    z_next = _block_mean(d, columns)
    torch.sub(q, z, out=d).div_(inv).sub_(w).abs_()
    err = float((d.T.contiguous() if columns else d).mean())
    # a margin so that float rounding of the threshold never hides a residual the reference shrinks
    t = inv * (beta ** (-1.0 / (2.0 - p)) * (1 - 1e-4))
    worst = torch.maximum(-(x_range[0] + z), x_range[1] + z - qmax).clamp_min_(0.5)
    rows = torch.nonzero(worst > t)[:, 0]
    if rows.numel():
        wr, qr, ir = w[rows], q[rows], inv[rows]
        w_e = shrink_lp(wr - (qr - z[rows]) / ir, beta, p)
        z_next[rows] = _block_mean(qr - (wr - w_e) * ir, columns)
    return z_next, err


def _fit_line(q: torch.Tensor, y: torch.Tensor, inv: torch.Tensor, z: torch.Tensor):
    """(inverse scale, zero) of the least-squares fit y ~ (q - z) s per block; blocks whose codes are all
    equal (no slope) keep theirs."""
    qm, ym = q.mean(-1, keepdim=True), y.mean(-1, keepdim=True)
    qc = q - qm
    var = qc.square().sum(-1, keepdim=True)
    s = (qc * (y - ym)).sum(-1, keepdim=True) / var
    ok = (var > 0) & (s > 0)
    s = torch.where(ok, s, inv.reciprocal())
    return torch.where(ok, s.reciprocal(), inv), torch.where(ok, qm - ym / s, z)


def hqq_optimize(w: torch.Tensor, bits: int, group_size: int | None, axis: int = 1, lp: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01, iters: int = 20, optimize_scale: bool = False):
    """HQQ on a 2-D float32 tensor w [out, in]: (codes, inverse scale, zero, steps taken) in the
    reference's layout: axis 1 makes groups of `group_size` consecutive elements of w.flatten()
    (codes [numel/g, g], inv/zero [numel/g, 1]), axis 0 takes them with stride numel/g (codes [g,
    numel/g], inv/zero [1, numel/g]); group_size None: one group per row (axis 1) or column (axis 0).
    Dequantise as (codes - zero) / inv. float32 throughout, as the reference computes on CPU."""
    qmax = (1 << bits) - 1
    if group_size is None:
        x = w.reshape(w.shape[0], -1) if axis == 1 else w.reshape(w.shape[0], -1).T
    elif w.numel() % group_size:
        raise LowbitError(f"group size {group_size} does not divide the weight's {w.numel()} elements")
    else:
        x = w.reshape(-1, group_size) if axis == 1 else w.reshape(group_size, -1).T
    x = x.float().contiguous()
    inv, z, n_steps = _hqq_loop(x, *minmax_start(x, qmax), qmax, lp, beta, kappa, iters, optimize_scale,
                                columns=axis == 0)
    codes = torch.round(x * inv + z).clamp_(0, qmax)
    if axis == 0:
        return codes.T, inv.T, z.T, n_steps
    return codes, inv, z, n_steps


def _hqq_loop(w_blocks: torch.Tensor, inv: torch.Tensor, z: torch.Tensor, qmax: int, lp: float, beta: float,
              kappa: float, iters: int, optimize_scale: bool, columns: bool = False):
    """The iteration on blocks [G, n] from (inverse scale, zero) [G, 1]: (inverse scale, zero, steps).
    columns: the reference holds the blocks as columns (axis 0), and its sums run in that order."""
    x = w_blocks * inv
    x_range = (x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))
    q, d = torch.empty_like(x), torch.empty_like(x)
    best = math.inf
    n = 0
    for n in range(1, iters + 1):
        z_next, err = _zero_step(w_blocks, x, inv, z, qmax, beta, lp, x_range, q, d, columns)
        if optimize_scale:
            y = w_blocks - shrink_lp(w_blocks - (q - z) / inv, beta, lp)
            inv_next, z_next = _fit_line(q, y, inv, z)
        z = z_next
        if optimize_scale:
            inv = inv_next
            x = w_blocks * inv
            x_range = (x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))
        beta *= kappa
        if not err < best:
            break
        best = err
    return inv, z, n


# ---------------------------------------------------------------------------------------------------
# The method

def _check(weight: torch.Tensor) -> torch.Tensor:
    check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise LowbitError(f"hqq quantises a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    return weight.detach().float()


def _stored_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """The scale as stored: to nearest in a float dtype (HQQ clamps codes, so a rounded-down scale
    cannot overflow the grid), up to a power of two in e8m0."""
    if scale_dtype == "e8m0":
        return round_scale_up(scale, scale_dtype)
    return scale.to(TORCH_FLOAT_DTYPES[scale_dtype]).float()


def hqq_quantize(weight: torch.Tensor, spec: QuantSpec, lp: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                 iters: int = 20, optimize_scale: bool = False) -> QuantizedTensor:
    """HQQ-quantise weight [out, in] under an asymmetric integer spec with float zero points, groups
    along the input dimension. The scale and zero are rounded to their stored dtypes and each code is
    then the nearest one given the stored values, so no element is worse than the reference's codes
    with the same stored scale and zero."""
    w = _check(weight)
    blocks = to_blocks(w, spec)                           # [out, groups, g]; raises if g does not divide
    flat = blocks.reshape(-1, blocks.shape[-1])
    qmax = spec.number_format.qmax
    inv, z, n_steps = _hqq_loop(flat, *minmax_start(flat, qmax), qmax, lp, beta, kappa, iters, optimize_scale)
    scale = _stored_scale(inv.reciprocal(), spec.scale_dtype)
    zero = round_zero(z, spec.zero_dtype)
    # With fp32 storage the codes are the reference's, W * inv + z; otherwise nearest to the stored pair.
    x_inv = inv if spec.scale_dtype == "fp32" else scale.reciprocal()
    codes = torch.round(flat * x_inv + zero).clamp_(0, qmax).to(torch.uint8).reshape(w.shape)
    rows, groups = blocks.shape[:2]
    qt = QuantizedTensor(codes, scale.reshape(rows, groups), zero.reshape(rows, groups), spec, weight.dtype)
    qt.extras["hqq_steps"] = n_steps
    return qt
