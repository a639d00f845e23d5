"""Formats defined by an explicit list of levels: NF4, bitsandbytes FP4, ternary."""
from __future__ import annotations

import torch

from lowbit.formats.base import NumberFormat, reject_nan

# The 16 NormalFloat levels of QLoRA (Dettmers et al. 2023), as published in bitsandbytes.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# bitsandbytes' FP4 (an E2M1 variant with its own code order), normalised by its largest value 12.
BNB_FP4_LEVELS = tuple(v / 12.0 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))

TERNARY_LEVELS = (-1.0, 0.0, 1.0)


class CodebookFormat(NumberFormat):
    """Code i decodes to levels[i]; encode picks the nearest level.

    A value exactly between two neighbouring levels goes to the lower one (bitsandbytes' rule:
    it bucketises against the midpoints of the sorted code book). Where two codes share a value
    (bnb FP4's +0 and -0) each keeps its own bucket, as in bitsandbytes' sort of all 16 codes: the
    shared value and just below it take the first code in table order, just above it the second.
    """

    def __init__(self, name: str, levels: tuple[float, ...], bits: int):
        assert len(levels) <= 1 << bits
        self.name = name
        self.bits = bits
        self.levels = torch.tensor(levels, dtype=torch.float32)
        # a stable sort keeps equal values in code order; their midpoint is the shared value itself
        self._sorted, order = torch.sort(self.levels + 0.0, stable=True)
        self._sorted_codes = order.to(torch.int64)
        self._midpoints = (self._sorted[1:] + self._sorted[:-1]) / 2

    def _build_table(self) -> torch.Tensor:
        table = torch.full((1 << self.bits,), torch.nan)
        table[: len(self.levels)] = self.levels
        return table

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        reject_nan(x, self.name)
        idx = torch.bucketize(x.float().contiguous(), self._midpoints, right=False)
        return self._sorted_codes[idx].to(self.code_dtype)
