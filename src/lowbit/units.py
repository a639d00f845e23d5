"""Sizes as people write them ("8GB", "24 GiB", "512MiB"): one parser for every command that takes one.

GB = 1e9 bytes, GiB = 2**30 bytes; both are printed because vendors and tools disagree on which to use.
"""
from __future__ import annotations

import re

GB = 1e9
GIB = 2**30
SIZE_UNITS = {"tib": 2**40, "tb": 1e12, "gib": GIB, "gb": GB, "g": GB, "mib": 2**20, "mb": 1e6, "kib": 2**10,
              "kb": 1e3, "b": 1}


def parse_size(text, bare_unit: float) -> float | None:
    """Bytes from "8GB", "24 GiB", "512MiB", "1e3gb" ("8" counts in bare_unit); None when unreadable."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", str(text).strip().lower().replace(" ", ""))
    if not m or (m.group(2) and m.group(2) not in SIZE_UNITS):
        return None
    return float(m.group(1)) * (SIZE_UNITS[m.group(2)] if m.group(2) else bare_unit)


def budget_linear_bytes(bits_per_weight: float, numel: int) -> int:
    """Bytes `--budget <bits>bpw` gives `numel` quantised Linear weights (codes, scales and zeros counted):
    bits x numel / 8, rounded down. pipeline/budget.py sizes its knapsack with this, the advisor its mixes."""
    return int(bits_per_weight * numel // 8)
