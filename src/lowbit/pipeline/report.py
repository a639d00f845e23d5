"""The per-layer report: how much each Linear's output moved, and anything numerically suspicious."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from lowbit.core import QuantizedTensor, block_shape
from lowbit.methods.stats import LayerStats
from lowbit.weights import ActQuantWeight, MixedInt8Weight
from lowbit.table import format_table


@dataclass
class LayerReport:
    name: str
    method: str
    shape: list
    bits_per_weight: float
    relative_error: float          # ||X(W-Q)^T|| / ||XW^T|| on the calibration inputs
    weight_error: float            # ||W-Q|| / ||W||
    n_tokens: int
    dead_inputs: int
    clipped_fraction: float | None  # weights moved by more than half a step (only clipping does that)
    warnings: list = field(default_factory=list)


def clipped_fraction(q, weight: torch.Tensor, approx: torch.Tensor) -> float | None:
    if isinstance(q, (ActQuantWeight, MixedInt8Weight)):
        q = q.weight
    if not isinstance(q, QuantizedTensor) or not q.spec.number_format.is_integer or q.g_idx is not None:
        return None
    rows, groups, size = block_shape(q.shape, q.spec)
    step = q.scale[..., None].expand(rows, groups, size).reshape(q.shape)
    moved = (weight - approx).abs() > step / 2 * (1 + 1e-4)
    return float(moved.float().mean())


def layer_report(name: str, method: str, weight: torch.Tensor, q, stats: LayerStats | None) -> LayerReport:
    approx = q.dequantize().float()
    warnings = list(getattr(q, "extras", {}).get("warnings", []))
    if not torch.isfinite(approx).all():
        warnings.append("dequantised weight has NaN or Inf")
    n_tokens = stats.n_tokens if stats is not None else 0
    dead = stats.dead_inputs if stats is not None else 0
    if stats is not None and n_tokens == 0:
        warnings.append("no calibration tokens reached this layer")
    if dead:
        warnings.append(f"{dead} input channels never active on calibration data")
    rel = stats.output_error(weight, approx) if stats is not None and n_tokens else float("nan")
    w_err = float((weight - approx).norm() / weight.norm()) if weight.norm() > 0 else 0.0
    bits = float(getattr(q, "bits_per_element", float("nan")))
    return LayerReport(name, method, list(weight.shape), bits, rel, w_err, n_tokens, dead,
                       clipped_fraction(q, weight, approx), warnings)


def report_to_json(layers: list[LayerReport]) -> str:
    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    return json.dumps([{k: clean(v) for k, v in asdict(r).items()} for r in layers], indent=1)


def summarize(layers: list[LayerReport], top: int = 5) -> str:
    if not layers:
        return "no layers were quantised"
    ranked = sorted(layers, key=lambda r: -(r.relative_error if not math.isnan(r.relative_error) else -1))
    rows = [[r.name, r.method, r.bits_per_weight, r.relative_error, r.weight_error,
             "-" if r.clipped_fraction is None else r.clipped_fraction] for r in ranked[:top]]
    n_warn = sum(bool(r.warnings) for r in layers)
    measured = [r.relative_error for r in layers if not math.isnan(r.relative_error)]
    mean = (f"mean relative output error {sum(measured) / len(measured):.4g}" if measured
            else "output errors not measured (no calibration pass)")
    lines = [f"{len(layers)} Linears quantised; {mean}. "
             f"The {min(top, len(layers))} that moved most:",
             format_table(["layer", "method", "bits/w", "rel. output err", "rel. weight err", "clipped"], rows)]
    if n_warn:
        lines.append(f"{n_warn} layers with warnings:")
        lines += [f"  {r.name}: {'; '.join(r.warnings)}" for r in layers if r.warnings][:20]
    return "\n".join(lines)
