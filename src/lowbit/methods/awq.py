"""AWQ (Lin et al., 2023): activation-aware weight quantisation.

A few input channels carry most of the activation energy; rounding errors on the weights that read
them cost the most. AWQ scales those weight columns up before rounding (W diag(s), so they are rounded
relatively finer) and folds 1/s into the op producing the input (pipeline/fold.py), so nothing runs
at serving time and the full-precision model is unchanged. Per group of Linears that share an input:

    s = mean|x|^alpha (optionally / w_mean^(1-alpha), AutoAWQ's "duo scaling"), s /= sqrt(max s * min s)

with alpha on the grid 0, 1/n_grid, ..., (n_grid-1)/n_grid chosen by the output error on calibration
batches when the group's weights are replaced by Q(W diag(s)) diag(s)^-1 (without duo scaling alpha = 0
gives s = 1, plain RTN, so the search can only improve on it). The search is `input_scales`
(methods/scaling.py): the pipeline folds what it returns, then gathers the statistics of the (now scaled)
inputs. Whose output is judged is `objective`:
- "module" (default, AutoAWQ's module2inspect): a group fed by a norm by the output of the smallest
  module holding it (q/k/v: the attention; gate/up: the MLP), one pass of that module over the search
  batches (`search_batches`, the first calibration batches) per grid point, the block stopped there; a
  group fed by a Linear (o_proj, down_proj) by its own output, through the Gram matrix of its input;
- "block": every group by the block's output (the MLP then runs for every candidate of q/k/v and o_proj
  too). On the bundled model (32 calibration windows) it took 1.7x the time for the same fidelity: KL
  0.00792 against "module"'s 0.00788 at int4 g128 (perplexity 46.46 against 46.50), 0.03417 against
  0.03402 at int3 (46.76 against 46.94); with round to nearest "module" is ahead on both (int4 46.56
  against 46.58, int3 47.74 against 47.82);
- "layer": every group by its own output through the Gram matrix (far cheaper: no pass at all);
- "mixed": "block" for groups fed by a norm, "layer" for the others.

Then, per Linear, a clipping search: for each output row and group of `group_size` inputs, the range
max|w| * r with r in 1, 1 - 1/n_grid, ... > 1 - max_shrink that minimises the group's output error
d^T (X^T X) d, d = w - Q(clip(w)). AutoAWQ estimates that on 512 sampled tokens; here it is exact over
every calibration token through the input Gram matrix the pipeline already keeps. AutoAWQ leaves q/k
projections unclipped (their error matters through attention scores, which its sampled estimate judges
poorly); with the exact error, clipping them too measured as good or better on the bundled model (round
to nearest: perplexity 46.57 against 46.61 at int4 g128, 47.74 against 48.18 at int3 g128), so it is the
default here ("noclipqk" restores AutoAWQ's choice).
The weights are then rounded by GPTQ (methods/gptq.py: act-order, the clipped ranges as its static group
scales, errors fed forward against the original weight), as llm-compressor's AWQ + GPTQ recipes do;
`gptq=False` ("rtn") rounds to nearest as AutoAWQ does. On all-MiniLM-L6-v2 (benchmarks/real_weights.py),
a post-norm encoder where no scale can be folded and AWQ can only clip, GPTQ rounding is what lifts AWQ
from RTN's level to GPTQ's. Asymmetric uint4 (or uint3) with fp16 scales, g128 by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lowbit.core import QuantizedTensor, QuantSpec, block_shape, fake_quantize, fake_quantize_blocks, quantize
from lowbit.core import get_observer, scale_and_zero
from lowbit.errors import LowbitError
from lowbit.methods.base import LayerInfo, SchemeMethod, register_method
from lowbit.methods.gptq import GPTQ, gptq_quantize
from lowbit.methods.scaling import InputScaling, ScaleContext

# Roles of the Linears whose outputs feed attention scores: AutoAWQ leaves them unclipped (clip_qk=False).
NO_CLIP_ROLES = ("attn_q", "attn_k", "attn_qkv")
# Scale search on the first 4 calibration batches (32 windows at the pipeline's batch size of 8): on the
# bundled model 2, 4 and all 16 batches gave perplexities within 0.05 of each other at 2x-8x the cost.
SEARCH_BATCHES = 4
MIN_SCALE = 1e-4
OBJECTIVES = ("block", "layer", "mixed", "module")


# ---------------------------------------------------------------------------------------------------
# Scale search

def group_weight_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """AutoAWQ's w_mean: |w| / max|w| of its quantisation group, averaged over every output row."""
    w = torch.cat([w.detach().float() for w in weights]).abs()
    g = group_size or w.shape[1]
    blocks = w.reshape(w.shape[0], -1, g)
    return (blocks / (blocks.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    s = x_mean.pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + MIN_SCALE)
    s = s.clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def layer_output_error(originals: list[torch.Tensor], approx: list[torch.Tensor], xtx: torch.Tensor) -> float:
    """sum over the group's Linears of ||X (W - W_hat)^T||^2 = tr(D X^T X D^T), exact over every token."""
    err = 0.0
    for w0, w1 in zip(originals, approx):
        d = (w0 - w1).double()
        err += float(((d @ xtx) * d).sum())
    return err


@torch.no_grad()
def search_scales(ctx: ScaleContext, config: "AWQ", block_error=None) -> tuple[torch.Tensor, float, float]:
    """(s in producer space, alpha, error) with the smallest error over the alpha grid. The error is the
    block's output error (block_error(approx weights)) or, without block_error, the group's own output
    error through its input Gram matrix."""
    x_mean = ctx.reduce(ctx.stats.act_absmean(), "mean")
    positive = x_mean[x_mean > 0]
    # a channel silent on calibration data keeps a moderate scale rather than an extreme one
    x_mean = x_mean.clamp(min=float(positive.min()) if positive.numel() else 1.0)
    w_mean = ctx.reduce(group_weight_mean(ctx.weights, config.group_size), "mean") if config.duo_scaling else None
    originals = [w.detach() for w in ctx.weights]
    best = (math.inf, None, 0.0)
    for i in range(config.n_grid):
        alpha = i / config.n_grid
        s = candidate_scales(x_mean, w_mean, alpha)
        s_cols = ctx.expand(s).float()
        approx = [(fake_quantize(w0.float() * s_cols, config.scheme) / s_cols).to(w0.dtype) for w0 in originals]
        err = layer_output_error(originals, approx, ctx.stats.xtx) if block_error is None else block_error(approx)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2], best[0]


# ---------------------------------------------------------------------------------------------------
# Clipping search

def _diagonal_blocks(xtx: torch.Tensor, groups: int, size: int) -> torch.Tensor:
    """[groups, size, size]: the Gram matrix of each group's inputs (the diagonal blocks of X^T X)."""
    return torch.stack([xtx[g * size:(g + 1) * size, g * size:(g + 1) * size] for g in range(groups)]).double()


def _clipped_fake_quant(blocks: torch.Tensor, limit: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    clipped = torch.maximum(torch.minimum(blocks, limit[..., None]), -limit[..., None])
    lo, hi = get_observer("minmax")(clipped, spec)
    scale, zero = scale_and_zero(lo, hi, spec)
    return fake_quantize_blocks(clipped, scale, zero, spec)


def clip_search(weight: torch.Tensor, xtx: torch.Tensor, spec: QuantSpec, n_grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped weight, chosen ratio per [row, group]) minimising each group's output error
    (w - q)^T (X^T X)_gg (w - q) over clipping ratios 1, 1 - 1/n_grid, ... (ratio 1: no clipping)."""
    rows, groups, size = block_shape(weight.shape, spec)
    blocks = weight.detach().float().reshape(rows, groups, size)
    gram = _diagonal_blocks(xtx, groups, size) if spec.granularity == "group" else xtx.double()[None]
    amax = blocks.abs().amax(-1)
    best_err = torch.full((rows, groups), math.inf, dtype=torch.float64)
    best_ratio = torch.ones(rows, groups)
    for i in range(max(1, int(round(max_shrink * n_grid)))):
        ratio = 1 - i / n_grid
        d = (blocks - _clipped_fake_quant(blocks, amax * ratio, spec)).double().transpose(0, 1)   # [g, r, i]
        err = (torch.bmm(d, gram) * d).sum(-1).T                                                  # [r, g]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    limit = (amax * best_ratio)[..., None]
    clipped = torch.maximum(torch.minimum(blocks, limit), -limit)
    return clipped.reshape(weight.shape).to(weight.dtype), best_ratio


# ---------------------------------------------------------------------------------------------------
# The method

@register_method
@dataclass(frozen=True)
class AWQ(InputScaling, SchemeMethod):
    """scheme: the grid (AWQ's default: asymmetric uint4, g128, fp16 scales). n_grid: alpha grid points;
    duo_scaling: divide by the weight's group-normalised magnitude too (AutoAWQ's default, not the
    paper's); clip / clip_qk / max_shrink: the clipping search (clip_qk=False leaves q/k unclipped, as
    AutoAWQ does); search_batches: calibration batches the scale search runs on (None: all); objective:
    whose output error the scale search minimises: "module", "block", "layer" or "mixed" (above)."""

    name = "awq"
    default_scheme = "uint4-g128"
    required_stats = ("hessian",)
    words = {"noclip": {"clip": False}, "noclipqk": {"clip_qk": False}, "duo": {"duo_scaling": True},
             "layer": {"objective": "layer"}, "mixed": {"objective": "mixed"}, "block": {"objective": "block"},
             "module": {"objective": "module"},
             "rtn": {"gptq": False}}
    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_qk: bool = True
    max_shrink: float = 0.5
    search_batches: int | None = SEARCH_BATCHES
    objective: str = "module"
    gptq: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise LowbitError(f"AWQ n_grid must be a positive integer, got {self.n_grid!r}")
        if not (isinstance(self.max_shrink, (int, float)) and 0 <= self.max_shrink < 1):
            raise LowbitError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink!r}")
        if self.objective not in OBJECTIVES:
            raise LowbitError(f"AWQ objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    @property
    def uses_block_error(self) -> bool:
        return self.objective != "layer"

    @property
    def error_scope(self) -> str:
        return "module" if self.objective == "module" else "block"

    @property
    def scale_search_batches(self) -> int | None:
        return self.search_batches

    def input_scales(self, ctx: ScaleContext) -> torch.Tensor | None:
        """The activation-aware scales of one group (producer space)."""
        use_block = self.objective == "block" or (self.objective != "layer" and ctx.producer == "norm")
        s, _, _ = search_scales(ctx, self, ctx.block_error if use_block else None)
        return s

    def for_layer(self, layer: LayerInfo) -> "AWQ":
        if self.clip and not self.clip_qk and layer.role in NO_CLIP_ROLES:
            return replace(self, clip=False)
        return self

    @property
    def sequential(self) -> bool:
        """GPTQ rounding wants each group's inputs from the already-quantised groups (true sequential)."""
        return self.gptq

    def quantize_weight(self, weight, stats=None) -> QuantizedTensor:
        spec = self.scheme
        w = weight
        calibrated = stats is not None and stats.n_tokens and stats.xtx is not None
        if self.clip and calibrated:
            w, _ = clip_search(weight, stats.xtx, spec, self.n_grid, self.max_shrink)
        if self.gptq and calibrated and spec.granularity in ("channel", "group"):
            # the grid the clipping search chose (core's scales, as it measured them), GPTQ's rounding
            rounding = GPTQ(scheme=spec, act_order=True, static_groups=True, full_grid=False, clip=False)
            return gptq_quantize(weight, stats.hessian(), rounding, scale_source=w)
        return quantize(w, spec, "minmax")
