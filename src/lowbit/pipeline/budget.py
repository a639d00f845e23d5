"""Mixed precision under a budget: sensitivities in, a Recipe (one scheme per Linear) out.

    --budget 3.5bpw     average bits per weight over the quantised Linears (codes, scales, zeros: the
                        stored bytes, as `lowbit eval` counts them)
    --budget 4GB        the whole model: the quantised Linears plus every other weight at fp16
                        (also GiB, MB, MiB, or a plain byte count)

The allocation minimises the summed measured KL (pipeline/sensitivity.py) under the budget, exactly, as a
multiple-choice knapsack (methods/knapsack.py).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods.base import SchemeMethod
from lowbit.methods.knapsack import Allocation, allocate
from lowbit.methods.recipe import DEFAULT_SKIP, Recipe
from lowbit.pipeline.sensitivity import (
    LayerSensitivity,
    candidate_configs,
    candidate_plans,
    measure_rounding,
    rank_correlation,
    sensitivity,
)
from lowbit.units import budget_linear_bytes, parse_size


@dataclass
class BudgetPlan:
    recipe: Recipe
    allocation: Allocation
    names: list[str]
    candidates: list[str]
    budget_bytes: int               # for the quantised Linears
    bits_per_weight: float          # of the allocation, over the quantised Linears
    rows: list[list]                # the table: layer, scheme, bits/weight, measured loss alone
    proxy_rank_correlation: float   # Spearman's rho of the Hessian proxy with the measured losses


def parse_budget(text: str) -> tuple[str, float]:
    """("bpw", bits per weight) or ("bytes", whole-model bytes) from "3.5bpw", "4GB", "512MiB", "1000000";
    a LowbitError for anything else (checked before any model work)."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(bpw|bits)", s)
    if m and float(m.group(1)) > 0:
        return "bpw", float(m.group(1))
    size = parse_size(s, 1)
    if size is None or size <= 0:
        raise LowbitError(f"cannot read a budget from {text!r}: use e.g. 3.5bpw, 4GB, 512MiB or a byte count")
    return "bytes", size


def linear_budget(text: str, model: nn.Module, numel: int) -> int:
    """Bytes the quantised Linears (numel weights in all) may take under the budget `text`."""
    kind, value = parse_budget(text)
    if kind == "bpw":
        return budget_linear_bytes(value, numel)
    rest = 2 * (sum(p.numel() for p in model.parameters()) - numel)      # every other weight at fp16
    if value <= rest:
        bare = re.fullmatch(r"[0-9]*\.?[0-9]+", str(text).strip()) is not None
        raise LowbitError(f"a budget of {text} leaves nothing for the quantised layers: the rest of the model "
                          f"takes {rest / 1e9:.3f} GB at fp16" + (f" (a bare number counts bytes; bits per weight "
                                                                  f"are written {text}bpw)" if bare else ""))
    return int(value - rest)


def check_budget(model: nn.Module, candidates, budget: str, skip: tuple = ()) -> str | None:
    """Refuse, from shapes alone (before any forward pass), a candidate whose sensitivity cannot be
    measured and a budget below the smallest candidate of every Linear. Returns a note when the budget
    holds the largest candidate of every Linear (the mix is then the least-loss candidate of each)."""
    configs = candidate_configs(candidates)
    for config in configs:
        measure_rounding(config)
    plans = candidate_plans(model, configs, skip)
    modules = dict(model.named_modules())
    names = [n for n in plans[0] if all(n in p for p in plans)]
    numel = sum(modules[n].weight.numel() for n in names)
    smallest = largest = 0
    for n in names:
        sizes = [w.nbytes for w in (cfg.planned_weight(modules[n].weight.shape, info) for cfg, info in
                                    (p[n] for p in plans)) if w is not None]
        smallest += min(sizes, default=0)
        largest += max(sizes, default=0)
    available = linear_budget(budget, model, numel)
    if smallest > available:
        raise LowbitError(f"budget {budget} is below the smallest mix of these candidates "
                          f"({8 * smallest / numel:.3f} bits per weight)")
    if largest and largest <= available:
        return (f"note: budget {budget} holds the largest candidate of every Linear ({8 * largest / numel:.3f} bits "
                f"per weight): the mix takes the least-loss candidate of each")
    return None


def plan_budget(layers: list[LayerSensitivity], candidates, budget: str, model: nn.Module,
                skip: tuple = ()) -> BudgetPlan:
    """The least-loss choice of one candidate per Linear within `budget`, as a Recipe and a table."""
    configs = candidate_configs(candidates)
    names = [c.short_name() for c in configs]
    numel = sum(layer.numel for layer in layers)
    limit = linear_budget(budget, model, numel)
    smallest = sum(min(layer.bytes) for layer in layers)
    if smallest > limit:
        raise LowbitError(f"budget {budget} is below the smallest mix of these candidates "
                          f"({8 * smallest / numel:.3f} bits per weight)")
    alloc = allocate([layer.bytes for layer in layers], [layer.kl for layer in layers], limit)
    overrides = [(layer.name, configs[j]) for layer, j in zip(layers, alloc.choice)]
    recipe = Recipe(configs[0], overrides, skip=tuple(DEFAULT_SKIP) + tuple(skip))
    rows = [[layer.name, names[j], 8 * layer.bytes[j] / layer.numel, layer.kl[j]]
            for layer, j in zip(layers, alloc.choice)]
    rho = rank_correlation([k for layer in layers for k in layer.kl], [p for layer in layers for p in layer.proxy])
    return BudgetPlan(recipe, alloc, [layer.name for layer in layers], names, limit, 8 * alloc.size / numel, rows,
                      rho)


def render_plan(plan: BudgetPlan) -> str:
    from lowbit.table import format_table

    counts = {n: sum(1 for r in plan.rows if r[1] == n) for n in plan.candidates}
    head = (f"mixed precision: {plan.bits_per_weight:.4f} bits per weight over the quantised Linears "
            f"({plan.allocation.size:,} bytes of a {plan.budget_bytes:,}); predicted KL (sum over layers) {plan.allocation.loss:.5g}; "
            + ", ".join(f"{n} x{c}" for n, c in counts.items()))
    head += (f"\nloss: each layer rounded alone, on calibration windows; the Hessian proxy ranks the same choices "
             f"with Spearman rho {plan.proxy_rank_correlation:.3f}")
    return head + "\n" + format_table(["layer", "scheme", "bits/weight", "loss alone"], plan.rows)


DEFAULT_SCHEMES = ("int2-g64", "int3-g128", "int3-g32", "int4-g128", "int4-g32", "int8")
SENSITIVITY_SAMPLES = 16


def default_candidates(method: str) -> list[str]:
    """The candidates `method` mixes under a budget: its own `budget_candidates` (QuIP#'s rates), else the
    integer grids of DEFAULT_SCHEMES under it (a bare scheme method name such as gptq, rtn)."""
    from lowbit.methods import METHODS

    cls = METHODS.get(method)
    if getattr(cls, "budget_candidates", None):
        return list(cls.budget_candidates)
    if cls is None or not issubclass(cls, SchemeMethod):
        raise LowbitError(f"give --candidates: {method} has no integer schemes to mix")
    return [f"{method}-{s}" for s in DEFAULT_SCHEMES]


def budget_recipe(model: nn.Module, tokenizer, budget: str, candidates, calibration=None,
                  n_samples: int = SENSITIVITY_SAMPLES, seq_len: int | None = None, seed: int = 0,
                  progress: bool = True, skip: tuple = ()) -> tuple[BudgetPlan, list[LayerSensitivity]]:
    """Measure sensitivities on calibration windows, then allocate: (the plan, the sensitivities). Linears
    matching `skip` stay in full precision and outside the budget."""
    from lowbit.pipeline.samples import (
        calibration_batch,
        check_context,
        check_token_ids,
        context_length,
    )

    note = check_budget(model, candidates, budget, skip)
    if note and progress:
        print(note, file=sys.stderr, flush=True)
    seq_len = seq_len or min(context_length(model) or 256, 256)
    check_context(model, seq_len)
    ids = calibration_batch(tokenizer, calibration, n_samples=n_samples, seq_len=seq_len, seed=seed)
    check_token_ids(model, ids)
    layers = sensitivity(model, candidates, ids, progress=progress, skip=skip)
    return plan_budget(layers, candidates, budget, model, skip), layers
