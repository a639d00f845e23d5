"""SpQR (Dettmers et al., 2023, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight
Compression"; reference code: the authors' spqr_engine.py): GPTQ's column loop with

- small groups (16 input columns) of 3-bit codes with a min-max scale and a float zero point per
  output row and group; those statistics are quantised again, to 3 bits in second-level groups of 16
  output rows, each with an fp16 scale and zero (so a first-level statistic costs 3 + 32/16 bits);
- outliers: a weight whose rounding error, scaled as GPTQ's update scales it, err = (w - q) / U_jj
  (U the upper Cholesky factor of H^-1; here (w - q) R_jj with H = R R^T), has err^2 above
  tau = outlier_threshold * mean_j(Var_rows(W[:, j]) R_jj^2) is kept in fp16 in a sparse matrix, and
  pushes no error onto later columns;
- group statistics fitted without the likely outliers: when a group is reached, each weight's
  leave-one-out gain (how much the row's R-weighted squared error falls when the min-max fit leaves
  that weight out) above tau marks it, and the fit sees the row's mean of the others in its place.

The loop, the Hessian factor and the paper's group state are GPTQ's (methods/gptq.py); this module adds
the outlier test per column and the statistics per group. The result is a `SpQRWeight`
(weights/sparse.py), whose bits per weight count everything stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, QuantSpec
from lowbit.errors import LowbitError
from lowbit.methods.base import SchemeMethod, register_method
from lowbit.methods.gptq import (_aligned_blocks, _check_finite, _check_hessian, _check_weight, column_order,
                                 hessian_factor, paper_state, reversed_hessian)
from lowbit.weights import placeholders
from lowbit.weights.sparse import SpQRWeight, csr_from_coo


@register_method
@dataclass(frozen=True)
class SpQR(SchemeMethod):
    """scheme: the base grid, asymmetric integer in groups (default uint3 g16). stat_bits, stat_group:
    the second-level quantisation of scales and zeros (3 bits in groups of 16 output rows).
    outlier_threshold: tau relative to the layer's mean sensitivity (inf: no outliers). loo: fit group
    statistics without the likely outliers (leave-one-out); act_order, damp, block_size: as GPTQ."""

    name = "spqr"
    default_scheme = "uint3-g16"
    required_stats = ("hessian",)
    sequential = True
    words = {"actorder": {"act_order": True}, "noloo": {"loo": False}, "t": "outlier_threshold",
             "sb": "stat_bits", "sg": "stat_group"}
    stat_bits: int = 3
    stat_group: int = 16
    outlier_threshold: float = 0.2
    loo: bool = True
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        s = self.scheme
        if s.symmetric or s.granularity != "group":
            raise LowbitError(f"spqr takes an asymmetric integer grid in groups (uint3-g16), not {s.format} "
                              f"{s.granularity}{'' if s.symmetric else ' asymmetric'}")
        if not (isinstance(self.stat_bits, int) and 1 <= self.stat_bits <= 8):
            raise LowbitError(f"spqr's stat_bits must be 1..8, got {self.stat_bits!r}")
        if not (isinstance(self.stat_group, int) and self.stat_group >= 1):
            raise LowbitError(f"spqr's stat_group must be a positive integer, got {self.stat_group!r}")
        if not (isinstance(self.outlier_threshold, (int, float)) and self.outlier_threshold > 0):
            raise LowbitError(f"spqr's outlier_threshold must be > 0 (inf: none), got {self.outlier_threshold!r}")
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < math.inf):
            raise LowbitError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise LowbitError(f"block_size must be a positive integer, got {self.block_size!r}")

    def quantize_weight(self, weight, stats=None) -> SpQRWeight:
        if stats is None or stats.n_tokens == 0:
            raise LowbitError("spqr needs a Hessian from calibration data, and no calibration tokens reached "
                              "this layer")
        return spqr_quantize(weight, stats.hessian(), self)

    def planned_weight(self, shape, layer) -> SpQRWeight:
        """A placeholder of the weight (no outliers; the outlier count is only known after the GPTQ pass)."""
        out, n_in = shape
        stat = QuantSpec(f"uint{self.stat_bits}", "group", self.stat_group, False, "fp16", "fp16")
        stats = placeholders.affine(torch.Size([n_in // self.group_size, out]), stat)
        g_idx = torch.zeros(n_in, dtype=torch.int32) if self.act_order else None
        return SpQRWeight(placeholders.affine(shape, self.scheme).codes, stats, stats,
                          torch.zeros(out + 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int16),
                          torch.zeros(0, dtype=torch.float16), self.scheme.bits, self.group_size, g_idx)


# ---------------------------------------------------------------------------------------------------
# Min-max grids, first and second level

def minmax_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x [..., n] mapping [min, max] onto 0..2^bits - 1 (the range as it is,
    not stretched to hold 0); a constant row gets scale 1."""
    lo, hi = x.amin(-1), x.amax(-1)
    scale = (hi - lo) / ((1 << bits) - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, -lo / scale


def fake_quantize_rows(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """x [..., n] rounded onto each row's grid (scale, zero [...]) and back."""
    s, z = scale[..., None], zero[..., None]
    return (torch.round(x / s + z).clamp_(0, (1 << bits) - 1) - z) * s


def quantize_stats(x: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """A statistic of every output row [out] quantised in groups of `group` rows: min-max, `bits`-bit
    codes, the group's scale and zero stored in fp16 (the code is nearest given the stored pair)."""
    blocks = x.reshape(-1, group)
    scale, zero = minmax_params(blocks, bits)
    scale = scale.half().float()
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    zero = zero.half().float()
    codes = torch.round(blocks / scale[:, None] + zero[:, None]).clamp_(0, (1 << bits) - 1).to(torch.uint8)
    spec = QuantSpec(f"uint{bits}", "group", group, False, "fp16", "fp16")
    return QuantizedTensor(codes.reshape(1, -1), scale.reshape(1, -1), zero.reshape(1, -1), spec)


def loo_gain(x: torch.Tensor, r_diag: torch.Tensor, bits: int) -> torch.Tensor:
    """For each weight of x [out, g] (a group's rows): how much the row's squared error, each column's
    scaled by R_jj (r_diag [g]), falls when the row's min-max grid is fitted without that weight and the
    weight itself is not quantised (the reference's get_leave_one_out_error). [out, g]."""
    g = x.shape[1]
    idx = torch.arange(g)
    others = torch.stack([torch.cat([idx[:k], idx[k + 1:]]) for k in range(g)])    # [g, g - 1]
    data = x[:, others]                                                            # [out, g, g - 1]
    scale, zero = minmax_params(data, bits)
    loo = ((fake_quantize_rows(data, scale, zero, bits) - data) * r_diag[others]).square().sum(-1)
    scale, zero = minmax_params(x, bits)
    base = ((fake_quantize_rows(x, scale, zero, bits) - x) * r_diag).square().sum(-1, keepdim=True)
    return base - loo


def fit_group(cols: torch.Tensor, r_diag: torch.Tensor, config: SpQR, tau: float):
    """Statistics of one group from its columns cols [g, out] (paper state): (scale, zero) as dequantised
    from their second-level quantisation, each [out], and those QuantizedTensors."""
    x = cols.T
    bits = config.scheme.bits
    if config.loo and math.isfinite(tau):
        likely = loo_gain(x, r_diag, bits) > tau
        keep = (~likely).float()
        mean = (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
        x = torch.where(likely, mean, x)
    scale, zero = minmax_params(x, bits)
    sq = quantize_stats(scale, config.stat_bits, config.stat_group)
    zq = quantize_stats(zero, config.stat_bits, config.stat_group)
    return sq.dequantize().reshape(-1), zq.dequantize().reshape(-1), sq, zq


# ---------------------------------------------------------------------------------------------------
# The column loop

def spqr_loop(w_orig: torch.Tensor, r: torch.Tensor, r_diag: torch.Tensor, config: SpQR, tau: float):
    """Quantise w_orig [in, out] (columns of W as rows, in visiting order) with GPTQ's unit triangular
    factor r and R's diagonal r_diag. Returns (levels uint8 [in, out], outlier corrections [in, out]
    (fp16 values, 0 elsewhere), outlier mask [in, out], per-group (scale, zero) QuantizedTensors)."""
    n_in, n_out = w_orig.shape
    group, bits = config.group_size, config.scheme.bits
    qmax = (1 << bits) - 1
    block, sub = _aligned_blocks(n_in, group, config.block_size)
    w = w_orig.clone()
    levels = torch.empty(n_in, n_out, dtype=torch.uint8)
    corrections = torch.zeros(n_in, n_out)
    mask = torch.zeros(n_in, n_out, dtype=torch.bool)
    stats = []
    diff = torch.empty(block, n_out, dtype=w.dtype)
    for b1 in range(0, n_in, block):
        b2 = min(b1 + block, n_in)
        for s1 in range(b1, b2, sub):
            s2 = min(s1 + sub, b2)
            for j in range(s1, s2):
                if j % group == 0:
                    cols = paper_state(w, w_orig, r, j, j + group)
                    scale, zero, sq, zq = fit_group(cols, r_diag[j:j + group], config, tau)
                    stats.append((sq, zq))
                    inv = 1.0 / scale
                v = w[j]
                lv = torch.round(v * inv + zero).clamp_(0, qmax)
                deq = (lv - zero) * scale
                miss = v - deq
                out = (miss * r_diag[j]).square() > tau
                # the outlier keeps its value as stored: the base plus an fp16 correction
                corr = torch.where(out, miss.half().float(), torch.zeros_like(miss))
                levels[j], corrections[j], mask[j] = lv.to(torch.uint8), corr, out
                d = diff[j - b1]
                torch.sub(w_orig[j], deq + corr, out=d)
                if j + 1 < s2:
                    w[j + 1:s2].addr_(r[j, j + 1:s2], d)
            if s2 < b2:
                w[s2:b2].addmm_(r[s1:s2, s2:b2].T, diff[s1 - b1:s2 - b1])
        if b2 < n_in:
            w[b2:].addmm_(r[b1:b2, b2:].T, diff[:b2 - b1])
    return levels, corrections, mask, stats


def outlier_tau(w_t: torch.Tensor, r_diag: torch.Tensor, relative: float) -> float:
    """The absolute threshold: relative * mean over columns of Var_rows(W[:, j]) R_jj^2 (the reference's
    outlier_scale, Var / U_jj^2)."""
    if not math.isfinite(relative):
        return math.inf
    return relative * float((w_t.var(dim=1) * r_diag.square()).mean())


def _check_shapes(n_out: int, n_in: int, config: SpQR) -> None:
    if n_in % config.group_size:
        raise LowbitError(f"group size {config.group_size} does not divide the weight's {n_in} input columns")
    if n_out % config.stat_group:
        raise LowbitError(f"spqr's second-level group of {config.stat_group} rows does not divide the weight's "
                          f"{n_out} output rows")


def spqr_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: SpQR) -> SpQRWeight:
    """SpQR-quantise weight [out, in] given H [in, in] (2/n X^T X). float32 throughout."""
    _check_weight(weight)
    n_out, n_in = weight.shape
    _check_hessian(hessian, n_in)
    _check_shapes(n_out, n_in, config)
    warnings: list[str] = []
    order = column_order(hessian.diagonal(), config.act_order)
    h_rev = reversed_hessian(hessian, order, torch.float32)
    r = hessian_factor(h_rev, config.damp, warnings)
    if r is None:
        raise LowbitError("spqr: " + warnings[-1].removeprefix("gptq: ").split(";")[0])
    # hessian_factor left the dampening it used on h_rev's diagonal; R's own diagonal sizes the errors.
    r_diag = torch.linalg.cholesky(h_rev).diagonal().flip(0).contiguous()
    w_t = weight.detach().float().T
    w_t = (w_t[order] if order is not None else w_t).contiguous()
    _check_finite(w_t, "weight")
    tau = outlier_tau(w_t, r_diag, config.outlier_threshold)
    levels, corrections, mask, stats = spqr_loop(w_t, r, r_diag, config, tau)
    g_idx = None
    if order is not None:
        back = torch.argsort(order)
        levels, corrections, mask = levels[back], corrections[back], mask[back]
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[order] = (torch.arange(n_in) // config.group_size).to(torch.int32)
    cols, rows = torch.nonzero(mask, as_tuple=True)
    row_ptr, col_idx, values = csr_from_coo(rows, cols, corrections[cols, rows], n_out)
    scale = _stack([s for s, _ in stats])
    zero = _stack([z for _, z in stats])
    q = SpQRWeight(levels.T.contiguous(), scale, zero, row_ptr, col_idx, values, config.scheme.bits,
                   config.group_size, g_idx, weight.dtype)
    q.extras["outlier_fraction"] = q.outlier_fraction
    if warnings:
        q.extras["warnings"] = warnings
    return q


def _stack(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """One QuantizedTensor [n_groups, out] from the per-group ones [1, out]."""
    first = parts[0]
    return QuantizedTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                           torch.cat([p.zero for p in parts]), first.spec)
