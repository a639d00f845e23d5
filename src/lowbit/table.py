"""Plain-text and Markdown tables: the way results people compare are shown."""
from __future__ import annotations

import math
import numbers

MAX_DECIMALS = 4     # a column never shows more decimals than this (0.001234 reads 0.0012)


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _decimals_needed(v: float) -> int:
    """Decimals v needs at four significant digits (one above 1000, as before)."""
    if abs(v) >= 1000:
        return 1
    text = f"{v:.4g}"
    return len(text.split(".")[1]) if "." in text else 0


def _column_format(values: list):
    """One way to print every number of a column, so the column reads at one precision: integers stay
    integers in an integer-only column; otherwise every number gets the most decimals any float needs
    (capped), or all go scientific when one is too small or too large for fixed decimals."""
    floats = [float(v) for v in values if _number(v) and not isinstance(v, numbers.Integral)
              and math.isfinite(v)]
    if not floats:
        return str  # integers only: as they are
    if any(v != 0 and not 1e-3 <= abs(v) < 1e6 for v in floats):
        return lambda v: f"{float(v):.3e}"
    decimals = min(MAX_DECIMALS, max(_decimals_needed(v) for v in floats))
    return lambda v: f"{float(v):,.{decimals}f}"


def _format_column(values: list) -> list[str]:
    fmt = _column_format(values)
    return [fmt(v) if _number(v) and math.isfinite(v) else str(v) for v in values]


def format_table(headers: list[str], rows: list[list], markdown: bool = False) -> str:
    columns = [_format_column([row[i] for row in rows]) for i in range(len(headers))]
    cells = [[col[j] for col in columns] for j in range(len(rows))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        parts = [v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts)

    sep = ("|" + "|".join("-" * (w + 2) for w in widths) + "|") if markdown else "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in cells])
