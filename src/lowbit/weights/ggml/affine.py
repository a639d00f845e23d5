"""Affine integer weights that *are* a legacy ggml block type, translated without rounding.

A QuantizedTensor on 32-element groups with fp16 scales holds exactly what a 32-element ggml block
holds when its grid matches: Q8_0 = int8 symmetric (x = d q), Q4_0 / Q5_0 = int4 / int5 symmetric
(x = d q, q in [-8, 7] / [-16, 15]), Q4_1 / Q5_1 = uint4 / uint5 with a zero point (x = d q - m,
m = d z, which must itself be an fp16 value). In float32, d q - d z = (q - z) d exactly when d z is
exact, so the translated blocks dequantise to the same float32 values bit for bit.
"""
from __future__ import annotations

import torch

from lowbit.core import QuantizedTensor
from lowbit.weights.ggml.block import BLOCK_TYPES
from lowbit.weights.ggml.fields import Fields
from lowbit.weights.ggml.tensor import GGMLTensor

LEGACY_GRIDS = {("int8", True): "Q8_0", ("int4", True): "Q4_0", ("int5", True): "Q5_0",
                ("uint4", False): "Q4_1", ("uint5", False): "Q5_1"}
GROUP = 32


def _is_fp16(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all()) and torch.equal(t.half().float(), t.float())


def legacy_type(qt) -> str | None:
    """The ggml type that holds `qt` exactly, or None."""
    if not isinstance(qt, QuantizedTensor) or qt.g_idx is not None:
        return None
    spec = qt.spec
    name = LEGACY_GRIDS.get((spec.format, spec.symmetric))
    if name is None or spec.granularity != "group" or spec.group_size != GROUP or spec.float_zero:
        return None
    if len(qt.shape) != 2 or not _is_fp16(qt.scale):
        return None
    if not spec.symmetric and not _is_fp16(qt.scale * qt.zero):
        return None
    return name


def ggml_from_affine(qt) -> GGMLTensor | None:
    """The GGMLTensor holding exactly the values of `qt`, or None when no legacy type does."""
    name = legacy_type(qt)
    if name is None:
        return None
    rows, cols = qt.shape
    levels = qt.spec.number_format.decode(qt.codes).to(torch.int32).reshape(rows, cols // GROUP, 1, GROUP)
    d = qt.scale.reshape(rows, cols // GROUP)
    dmin = None if qt.spec.symmetric else (qt.scale * qt.zero).reshape(rows, cols // GROUP)
    blocks = BLOCK_TYPES[name].pack(Fields(d, levels, dmin=dmin)).reshape(rows, -1).contiguous()
    return GGMLTensor(blocks, name, torch.Size(qt.shape), qt.dtype)
