"""The multiple-choice knapsack behind mixed precision: one scheme per layer, total size within a budget,
least predicted loss (as HAWQ-V3 and llama.cpp-style allocators pose it, with the loss additive over
layers).

Solved exactly by dynamic programming over the size: sizes are divided by their greatest common divisor
(sizes of quantised matrices share large factors: rows x group counts x bits), so the table is
items x (budget / gcd) cells. When that is still too large, sizes are rounded *up* to a coarser unit, which
never lets the choice exceed the budget; `Allocation.unit` says which unit the optimum is exact at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import torch

from lowbit.errors import LowbitError

MAX_CELLS = 64_000_000      # items x budget units: the choice table is int8 of this many bytes


@dataclass(frozen=True)
class Allocation:
    choice: list[int]       # the option picked for each item
    size: int               # total size of the picks (original units)
    loss: float             # total loss of the picks
    unit: int               # sizes were counted in multiples of this (1 = exactly)


def allocate(sizes: list[list[int]], losses: list[list[float]], budget: int) -> Allocation:
    """Pick one option per item (sizes[i][j] >= 0 integers, losses[i][j] finite) with sum of sizes <= budget
    and the least sum of losses. Raises LowbitError when even the smallest options exceed the budget."""
    _check(sizes, losses, budget)
    n_items = len(sizes)
    unit = reduce(math.gcd, [s for row in sizes for s in row if s], 0) or 1
    width = budget // unit
    if n_items * (width + 1) > MAX_CELLS:
        unit = math.ceil(budget / (MAX_CELLS // n_items - 1))
        width = budget // unit
    cost = [[-(-s // unit) for s in row] for row in sizes]   # rounded up: a pick never exceeds the budget
    if sum(min(row) for row in cost) > width:
        need = sum(min(row) for row in sizes)
        raise LowbitError(f"the budget ({budget:,}) is below the smallest choice for every layer ({need:,})")
    best, choice = _table(cost, losses, width)
    end = int(torch.argmin(best))
    picks = _backtrack(choice, cost, end)
    return Allocation(picks, sum(sizes[i][j] for i, j in enumerate(picks)),
                      sum(losses[i][j] for i, j in enumerate(picks)), unit)


def _table(cost, losses, width: int):
    """best[w]: least loss of all items at total cost exactly w; choice[i, w]: the option of item i there."""
    inf = torch.tensor(math.inf, dtype=torch.float64)
    best = torch.full((width + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.full((len(cost), width + 1), -1, dtype=torch.int8)
    for i, (row_cost, row_loss) in enumerate(zip(cost, losses)):
        new = torch.full_like(best, math.inf)
        for j, (c, loss) in enumerate(zip(row_cost, row_loss)):
            if c > width:
                continue
            shifted = torch.cat([inf.expand(c), best[: width + 1 - c]]) + loss
            better = shifted < new          # strict: ties keep the earlier option, so the result is deterministic
            new = torch.where(better, shifted, new)
            choice[i][better] = j
        best = new
    return best, choice


def _backtrack(choice: torch.Tensor, cost, end: int) -> list[int]:
    picks, w = [], end
    for i in range(len(cost) - 1, -1, -1):
        j = int(choice[i, w])
        picks.append(j)
        w -= cost[i][j]
    return picks[::-1]


def _check(sizes, losses, budget) -> None:
    if not sizes or len(sizes) != len(losses):
        raise LowbitError("allocation needs one row of sizes and one of losses per layer")
    if len(sizes) and max(len(r) for r in sizes) > 127:
        raise LowbitError("at most 127 options per layer")
    for s_row, l_row in zip(sizes, losses):
        if not s_row or len(s_row) != len(l_row):
            raise LowbitError("every layer needs as many losses as sizes, at least one")
        if any(not isinstance(s, int) or s < 0 for s in s_row):
            raise LowbitError("sizes must be non-negative integers")
        if any(not math.isfinite(v) for v in l_row):
            raise LowbitError("losses must be finite numbers")
    if not isinstance(budget, int) or budget < 0:
        raise LowbitError(f"the budget must be a non-negative integer size, got {budget!r}")
