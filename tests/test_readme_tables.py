"""The README's hand-written tables read at one precision per column (issue 14: `10` next to `5.551`).

Every Markdown table of README.md and benchmarks/README.md is parsed; in each column the cells that are a
plain number (optionally followed by a space and a unit or a note: `46.30`, `+0.85 (+1.8%)`, `8.000 (8.000)`)
must all show the same number of decimals, and a column may not mix fixed and scientific notation. Integer
columns, empty cells, `-` / `—`, ratios (`1.9x`), percentages (`66%`), bounds (`<1`, `~3`) and text are
allowed. lowbit's own tables follow the same rule (lowbit.table, tests/test_table.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/README.md")
# a number that is the whole cell or is followed by a space (a unit, a note in brackets)
NUMBER = re.compile(r"^[+\-−]?\d[\d,]*(?:\.(\d+))?(?P<sci>[eE][+\-]?\d+)?(?: .*)?$")
SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")


def cells(line: str) -> list[str]:
    """The cells of a Markdown table row; `|` inside backticks or escaped as `\\|` does not split."""
    out, cell, code = [], "", False
    body = line.strip().removeprefix("|").removesuffix("|")
    for i, ch in enumerate(body):
        if ch == "`":
            code = not code
        if ch == "|" and not code and (i == 0 or body[i - 1] != "\\"):
            out.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return out + [cell.strip()]


def tables(text: str):
    """(line number of the header, header cells, rows of cells) of every Markdown table in `text`."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].lstrip().startswith("|") and SEPARATOR.match(lines[i + 1].strip()) and \
                not (i and lines[i - 1].lstrip().startswith("|")):
            rows = []
            for line in lines[i + 2:]:
                if not line.lstrip().startswith("|"):
                    break
                rows.append(cells(line))
            yield i + 1, cells(lines[i]), rows


def precision(cell: str) -> str | None:
    """How a numeric cell shows its number ("2 decimals", "scientific"), or None for other cells."""
    m = NUMBER.match(cell.strip().strip("*`").strip())
    if m is None:
        return None
    return "scientific" if m["sci"] else f"{len(m[1] or '')} decimals"


def mixed_columns(text: str) -> list[str]:
    problems = []
    for line, header, rows in tables(text):
        for c, name in enumerate(header):
            shown = {}
            for row in rows:
                kind = precision(row[c]) if c < len(row) else None
                if kind is not None:
                    shown.setdefault(kind, row[c])
            if len(shown) > 1:
                problems.append(f"line {line}, column {name!r}: " + ", ".join(f"{v!r} ({k})" for k, v in shown.items()))
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_every_numeric_column_shows_one_precision(doc):
    problems = mixed_columns((ROOT / doc).read_text())
    assert not problems, "\n".join(problems)


def test_the_check_finds_what_it_should():
    table = "| a | b | c | d | e |\n|---|---|---|---|---|\n"
    assert mixed_columns(table + "| 10 | 1.0 | 3x | 1.5 GB | 0.0247 |\n| 5.551 | 2.0 | 1.25x | 2.25 GB | 9.5e-05 |\n") == [
        "line 1, column 'a': '10' (0 decimals), '5.551' (3 decimals)",
        "line 1, column 'd': '1.5 GB' (1 decimals), '2.25 GB' (2 decimals)",
        "line 1, column 'e': '0.0247' (4 decimals), '9.5e-05' (scientific)"]
    fine = table + "| 16 | +0.85 (+1.8%) | - | 66% | `a|b` |\n| 8 | **-0.01** | — | 7% | text 1.5 |\n| | <1 | | | |\n"
    assert mixed_columns(fine) == []
    assert precision("2.5.1") is None and precision("1,024") == "0 decimals" and precision("`4.125`") == "3 decimals"
