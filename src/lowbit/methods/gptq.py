"""GPTQ (Frantar et al., 2022): quantise a Linear's weight one input column at a time, pushing each
column's rounding error onto the columns not yet quantised so that the layer's output error
||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) / 2, with H = 2/n X^T X, stays small.

The paper writes the update with U, the upper Cholesky factor of H^-1: err_i = (w_i - q_i) / U_ii,
w_j -= err_i U_ij for j > i. Here the same update is written with R = U^-1, the upper triangular
factor of H = R R^T, which one Cholesky factorisation of H with its index order reversed yields:

    w_j (when column j is reached) = w_j (original) + sum_{i<j} (w_i (original) - q_i) R_ij / R_jj

This is algebraically the paper's algorithm (W - Q = Err U, so Err = (W - Q) R), but it needs no matrix
inverse and no second factorisation: a third of the reference's dense linear algebra. The column loop
is the paper's "lazy batch" form, two levels deep: rank-1 updates inside a sub-block of 16 columns, a
matrix product into the rest of the block of `block_size` columns, and one into every later column.
The working copy is kept transposed ([in, out]) so that a column is contiguous in memory.

Groups: scales are chosen when a group is reached, from the weights as updated so far (the paper),
or up front from the original weights (`static_groups`). With `act_order` the columns are visited by
decreasing H_ii (inputs with the most energy first); dynamic groups are then groups of that order,
and `g_idx` maps each column to its group. Grids and scales come from core (`scale_and_zero`), the
same definition RTN uses; see `full_grid` for the one choice GPTQ makes differently by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, QuantSpec, check_tensor, fake_quantize_blocks, global_scale, scale_and_zero
from lowbit.errors import LowbitError
from lowbit.methods.base import SchemeMethod, register_method
from lowbit.weights import placeholders
from lowbit.methods.clipping import block_range, hessian_clip_params
from lowbit.methods.rtn import BLOCK_ACT_WORDS, block_activations, check_act_bits, planned_block_activations

SUB_BLOCK = 16              # columns per rank-1 sub-block inside a lazy-update block
DAMP_RETRIES = 6            # each retry multiplies the dampening by 10
MSE_GRID, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4   # the reference GPTQ's clipping search


@register_method
@dataclass(frozen=True)
class GPTQ(SchemeMethod):
    """scheme: the grid (default int4 g128 symmetric; any integer grid, code book or float format of a
    QuantSpec, per channel or group). act_order: visit columns by decreasing H_ii. static_groups:
    compute every group's scale from the original weights before the column loop. damp: fraction of the
    mean diagonal of H added to it. block_size: columns per lazy update. mse: search each group's
    clipping range for the smallest ||w - q||^2.4 (as the reference does) instead of using min-max.
    clip (static groups; dynamic ones and mse ignore it): search each group's clipping range for the
    smallest output error through the Hessian's diagonal block instead (methods/clipping.py, AWQ's
    clipping search on GPTQ's grid).
    full_grid (symmetric integer grids): the scale is 2 absmax / (2^bits - 1), as in GPTQ, AutoGPTQ and
    llm-compressor: all 2^bits codes span [-absmax, absmax] (a 7% finer step at 4 bits; the absmax, half
    a step above the top code, rounds onto it), where False gives core's and RTN's symmetric scale,
    absmax / (2^(bits-1) - 1), whose most negative code then stays unused. Every weight stays within
    half a step either way."""

    name = "gptq"
    required_stats = ("hessian",)
    sequential = True
    words = {"actorder": {"act_order": True}, "noactorder": {"act_order": False}, "static": {"static_groups": True},
             "dynamic": {"static_groups": False}, "mse": {"mse": True}, "clip": {"clip": True}, "noclip": {"clip": False},
             "damp": "damp", **BLOCK_ACT_WORDS}
    # Act-order with static groups (llm-compressor's default) whose ranges are clipped for the least
    # output error: the best measured on real weights (all-MiniLM-L6-v2, benchmarks/real_weights.py:
    # mean cosine at int4 g128 0.9850 against 0.9831 min-max, 0.9852 mse; at int3 0.9384, 0.9162,
    # 0.9356). The paper's plain order, dynamic groups and min-max ranges: "noactorder-dynamic-noclip".
    act_order: bool = True
    static_groups: bool = True
    damp: float = 0.01
    block_size: int = 128
    mse: bool = False
    full_grid: bool = True
    clip: bool = True
    # Block-format activations (a4 / a6 / a8 on MX and NVFP4 schemes; methods/rtn.py). NVFP4's G_x needs
    # max|x|, which the stats that carry the Hessian always carry too (LayerStats keeps both).
    act_bits: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_act_bits(self)
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp and math.isfinite(self.damp)):
            raise LowbitError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise LowbitError(f"block_size must be a positive integer, got {self.block_size!r}")

    def quantize_weight(self, weight, stats=None):
        if stats is None or stats.n_tokens == 0:
            q = round_to_nearest(weight, self)
            q.extras.setdefault("warnings", []).append(
                "gptq: no calibration tokens reached this layer; rounded to nearest (RTN) instead")
        else:
            q = gptq_quantize(weight, stats.hessian(), self)
        return q if self.act_bits is None else block_activations(self, q, stats)

    def planned_weight(self, shape, layer):
        group_index = self.act_order and not self.static_groups and self.scheme.granularity == "group"
        q = placeholders.affine(shape, self.scheme, g_idx=group_index)
        return q if self.act_bits is None else planned_block_activations(self, q)


# ---------------------------------------------------------------------------------------------------
# Scales of a group

def group_range(cols: torch.Tensor, spec: QuantSpec, full_grid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max range (lo, hi) per output channel of `cols` [columns, out]; on the full grid the absmax
    rounds onto the top code, an error of at most half a step, as for every other element."""
    return block_range(cols.amin(0), cols.amax(0), spec, full_grid)


def group_params(cols: torch.Tensor, spec: QuantSpec, full_grid: bool, mse: bool, gs=None):
    """(scale, zero) per output channel for the columns `cols` [columns, out] of one group; gs: the
    weight's global scale (NVFP4), None otherwise."""
    lo, hi = group_range(cols, spec, full_grid)
    if not mse:
        return scale_and_zero(lo, hi, spec, gs)
    return _mse_params(cols.T.unsqueeze(1).float(), lo.unsqueeze(1), hi.unsqueeze(1), spec, gs)


def _mse_params(blocks, lo0, hi0, spec, gs=None):
    """Shrink the range by 1, 0.99, ... (80 steps) and keep, per block, the one with least |error|^2.4."""
    best_err = torch.full_like(lo0, torch.inf)
    best_scale, best_zero = scale_and_zero(lo0, hi0, spec, gs)
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        ratio = 1.0 - i / MSE_GRID
        scale, zero = scale_and_zero(lo0 * ratio, hi0 * ratio, spec, gs)
        err = (fake_quantize_blocks(blocks, scale, zero, spec) - blocks).abs_().pow_(MSE_NORM).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale.squeeze(1), best_zero.squeeze(1)


def static_group_params(w: torch.Tensor, spec: QuantSpec, group: int, full_grid: bool, mse: bool, gs=None):
    """(scale, zero), each [n_groups, out], of the contiguous column groups of w [out, in]."""
    n_groups = w.shape[1] // group
    pairs = [group_params(w[:, g * group:(g + 1) * group].T, spec, full_grid, mse, gs) for g in range(n_groups)]
    return torch.stack([s for s, _ in pairs]), torch.stack([z for _, z in pairs])


# ---------------------------------------------------------------------------------------------------
# The Hessian factor

def column_order(diag: torch.Tensor, act_order: bool) -> torch.Tensor | None:
    """Columns by decreasing H_ii (stable, so ties keep their index order), or None for the identity."""
    return torch.argsort(diag, descending=True, stable=True) if act_order else None


def hessian_factor(h_rev: torch.Tensor, damp: float, warnings: list[str]) -> torch.Tensor | None:
    """r = R / diag(R) (unit upper triangular), R the upper triangular factor of the dampened H = R R^T,
    from h_rev = H with rows and columns in reversed visiting order: its lower Cholesky factor is R
    reversed. None if H cannot be made positive definite (the caller then rounds to nearest).
    Dead inputs must already have a positive diagonal. Modifies h_rev's diagonal."""
    diag = h_rev.diagonal()
    undamped = diag.clone()
    mean = float(undamped.mean())
    if not mean > 0:
        warnings.append("gptq: Hessian has no positive diagonal; rounded to nearest (RTN) instead")
        return None
    first = damp if damp > 0 else 1e-4   # damp 0 asks for none, but a singular H still needs some
    tries = ([0.0] if damp == 0 else []) + [first * 10 ** k for k in range(DAMP_RETRIES)]
    for used in tries:
        diag.copy_(undamped).add_(used * mean)
        low, info = torch.linalg.cholesky_ex(h_rev)
        if int(info) == 0:
            if used != tries[0]:
                warnings.append(f"gptq: Hessian not positive definite at damp {tries[0]:g}; used damp {used:g}")
            r = low.flip(0, 1)
            return r.div_(r.diagonal().clone())
    warnings.append(f"gptq: Hessian not positive definite even at damp {tries[-1]:g}; "
                    "rounded to nearest (RTN) instead")
    return None


def reversed_hessian(hessian: torch.Tensor, order: torch.Tensor | None, dtype) -> torch.Tensor:
    """H with rows and columns in reversed visiting order (one gather), dead inputs (H_ii = 0: never
    active) given the mean live diagonal so that H stays invertible; their rows and columns are zero,
    so no error reaches or leaves them: their weights are simply rounded to nearest."""
    if order is None:
        h = hessian.to(dtype).flip(0, 1)
    else:
        idx = order.flip(0)
        h = hessian.index_select(0, idx).index_select(1, idx).to(dtype)
    diag = h.diagonal()
    dead = diag == 0
    if dead.any():
        live = diag[~dead]
        diag[dead] = live.mean() if live.numel() else 1.0
    return h


# ---------------------------------------------------------------------------------------------------
# The column loop

@dataclass
class _Groups:
    """Where scales come from during the loop: one set per group, chosen up front or when reached."""

    size: int
    static_scale: torch.Tensor | None = None     # [n_groups, out] when computed up front
    static_zero: torch.Tensor | None = None
    group_of: torch.Tensor | None = None         # group of each visited column (static groups)


def _aligned_blocks(in_features: int, group: int, block_size: int) -> tuple[int, int]:
    """(block, sub-block) sizes such that every group starts at a sub-block start; the weights of a
    group are then fully updated when its scale is chosen."""
    if group < in_features and block_size % group and group % block_size:
        block_size = group * max(1, round(block_size / group))
    sub = math.gcd(SUB_BLOCK, block_size, group if group < in_features else block_size)
    return block_size, sub


def paper_state(w: torch.Tensor, w_orig: torch.Tensor, r: torch.Tensor, j: int, k: int) -> torch.Tensor:
    """Columns j..k-1 as the paper's algorithm holds them once columns < j are quantised.

    Both forms agree on a column's value when it is reached, but not on the columns after it: the
    paper's are the least-squares optimum given what is fixed (W_J - Err_{<j} U_{<j,J}), ours after
    columns < j are (W_J + D_{<j} r_{<j,J}). The two are related by r_JJ: paper = W_J + (ours - W_J)
    r_JJ^-1, one small triangular solve per group, so dynamic group scales match the paper exactly."""
    if j == 0:
        return w[j:k]
    # Inverting the small triangle first turns a slow many-column triangular solve into one GEMM.
    eye = torch.eye(k - j, dtype=r.dtype)
    inv = torch.linalg.solve_triangular(r[j:k, j:k].T, eye, upper=False, unitriangular=True)
    return torch.addmm(w_orig[j:k], inv, w[j:k] - w_orig[j:k])


def gptq_loop(w_orig: torch.Tensor, r: torch.Tensor, spec: QuantSpec, groups: _Groups,
              block_size: int, full_grid: bool, mse: bool, gs=None):
    """Quantise w_orig [in, out] (columns of W as rows, in visiting order) with the unit upper
    triangular factor r = R / diag(R). Returns (levels [in, out], scale [n_groups, out], zero
    [n_groups, out]), the scales of dynamic groups in the order the groups were reached."""
    n_in, n_out = w_orig.shape
    fmt = spec.number_format
    has_zero = not spec.symmetric or spec.implied_zero != 0
    block, sub = _aligned_blocks(n_in, groups.size, block_size)
    w = w_orig.clone()                      # updated weights; row j is final when column j is reached
    # integer levels fit int16; other formats keep their (exact) float values
    levels = torch.empty(n_in, n_out, dtype=torch.int16 if fmt.is_integer else torch.float32)
    scales = torch.empty(n_in // groups.size, n_out, dtype=torch.float32)
    zeros = torch.empty_like(scales)
    diff = torch.empty(block, n_out, dtype=w.dtype)   # w_orig - q of the current block's columns
    for b1 in range(0, n_in, block):
        b2 = min(b1 + block, n_in)
        for s1 in range(b1, b2, sub):
            s2 = min(s1 + sub, b2)
            for j in range(s1, s2):
                if groups.static_scale is not None:
                    g = int(groups.group_of[j])
                    scale, zero = groups.static_scale[g], groups.static_zero[g]
                elif j % groups.size == 0:
                    g = j // groups.size
                    cols = paper_state(w, w_orig, r, j, j + groups.size)
                    scale, zero = group_params(cols, spec, full_grid, mse, gs)
                    scales[g], zeros[g] = scale, zero
                lv = w[j].div(scale)
                if has_zero:
                    lv.add_(zero)
                lv = round_levels(lv, fmt)
                levels[j] = lv
                d = diff[j - b1]
                torch.sub(lv, zero, out=d) if has_zero else d.copy_(lv)
                d.mul_(scale).neg_().add_(w_orig[j])
                if j + 1 < s2:
                    w[j + 1:s2].addr_(r[j, j + 1:s2], d)
            if s2 < b2:
                w[s2:b2].addmm_(r[s1:s2, s2:b2].T, diff[s1 - b1:s2 - b1])
        if b2 < n_in:
            w[b2:].addmm_(r[b1:b2, b2:].T, diff[:b2 - b1])
    if groups.static_scale is not None:
        return levels, groups.static_scale, groups.static_zero
    return levels, scales, zeros


def _group_size(group_size: int | None, in_features: int) -> int:
    if group_size is None:
        return in_features
    if in_features % group_size:
        raise LowbitError(f"group size {group_size} does not divide the weight's {in_features} input columns")
    return group_size


def _check_finite(x: torch.Tensor, what: str) -> None:
    # A finite sum means no NaN or Inf (one fast pass); otherwise core's check finds and names the
    # problem, or passes if the sum merely overflowed.
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() and torch.isfinite(x.sum())):
        check_tensor(x, what)


def _check_weight(weight: torch.Tensor) -> None:
    _check_finite(weight, "weight")
    if weight.dim() != 2:
        raise LowbitError(f"GPTQ quantises a 2-D weight [out, in], got shape {tuple(weight.shape)}")


def _check_hessian(hessian: torch.Tensor, n: int) -> None:
    _check_finite(hessian, "hessian")
    if tuple(hessian.shape) != (n, n):
        raise LowbitError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's {n} input columns")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQ,
                  scale_source: torch.Tensor | None = None) -> QuantizedTensor:
    """GPTQ-quantise weight [out, in] given H [in, in] (2/n X^T X of its calibration inputs).

    scale_source [out, in]: static group scales are taken from it instead of the weight (AWQ passes its
    clipped weight: the grid is the clipped range, the error fed forward is against the original
    weight). Computes in float64 when the weight is float64, in float32 otherwise. Warnings (more
    dampening needed, RTN fallback) are listed in `extras["warnings"]`."""
    _check_weight(weight)
    n_out, n_in = weight.shape
    _check_hessian(hessian, n_in)
    spec = config.scheme
    group = _group_size(config.group_size, n_in)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    warnings: list[str] = []
    order = column_order(hessian.diagonal(), config.act_order)
    r = hessian_factor(reversed_hessian(hessian, order, dtype), config.damp, warnings)
    if r is None:
        qt = round_to_nearest(weight, config)
        qt.extras["warnings"] = warnings
        return qt
    w_t = weight.detach().to(dtype).T
    gs = global_scale(weight if scale_source is None else scale_source, spec)
    w_t = (w_t[order] if order is not None else w_t).contiguous()
    groups = _Groups(group)
    if config.static_groups or group == n_in:
        # One scale per channel is "reached" at column 0, before any update: static by nature.
        source = (weight if scale_source is None else scale_source).detach().to(dtype)
        if config.clip and not config.mse:
            groups.static_scale, groups.static_zero = hessian_clip_params(source, hessian, spec, group,
                                                                          config.full_grid, gs=gs)
        else:
            groups.static_scale, groups.static_zero = static_group_params(source, spec, group, config.full_grid,
                                                                          config.mse, gs)
        groups.group_of = (order if order is not None else torch.arange(n_in)) // group
    levels, scales, zeros = gptq_loop(w_t, r, spec, groups, config.block_size, config.full_grid, config.mse, gs)
    g_idx = None
    if order is not None:
        levels = levels[torch.argsort(order)]
        if groups.static_scale is None:
            g_idx = torch.empty(n_in, dtype=torch.int32)
            g_idx[order] = (torch.arange(n_in) // group).to(torch.int32)
    qt = _assemble(levels.T, scales.T, zeros.T, spec, weight.dtype, g_idx, gs)
    if warnings:
        qt.extras["warnings"] = warnings
    return qt


def round_levels(x: torch.Tensor, fmt) -> torch.Tensor:
    """x rounded onto the format's values, in place for integer grids (the hot path)."""
    if fmt.is_integer:
        return x.round_().clamp_(float(fmt.qmin), float(fmt.qmax))
    return fmt.round(x).to(x.dtype)


def _assemble(levels, scale, zero, spec: QuantSpec, dtype, g_idx, gs=None) -> QuantizedTensor:
    """A QuantizedTensor from levels [out, in] (values of the format) and scale, zero [out, n_groups].
    An integer format's code is its level's low `bits` bits (two's complement)."""
    if spec.number_format.is_integer:
        codes = (levels.to(torch.int16) & ((1 << spec.bits) - 1)).to(torch.uint8)
    else:
        codes = spec.number_format.encode(levels.float())
    scale = scale.contiguous().float()
    zero = zero.contiguous().float() if not spec.symmetric else torch.full_like(scale, spec.implied_zero)
    return QuantizedTensor(codes, scale, zero, spec, dtype, g_idx, {} if gs is None else {"global_scale": gs})


def round_to_nearest(weight: torch.Tensor, config: GPTQ) -> QuantizedTensor:
    """GPTQ's grid without error feedback: what a layer gets when it saw no calibration tokens."""
    _check_weight(weight)
    spec = config.scheme
    n_out, n_in = weight.shape
    group = _group_size(config.group_size, n_in)
    w = weight.detach().float()
    gs = global_scale(w, spec)
    scale, zero = static_group_params(w, spec, group, config.full_grid, config.mse, gs)
    blocks = w.reshape(n_out, n_in // group, group)
    levels = round_levels(blocks / scale.T[..., None] + zero.T[..., None], spec.number_format)
    return _assemble(levels.reshape(n_out, n_in), scale.T, zero.T, spec, weight.dtype, None, gs)
