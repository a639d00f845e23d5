"""Ternary weights (one float16 absmean scale per tensor) that *are* TQ1_0 / TQ2_0 blocks, translated
without rounding: every 256-block gets d = the tensor's scale and the weight's own codes, so llama.cpp's
d * q equals our scale * code bit for bit (both are float16 values times 0 or ±1)."""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.weights.ggml.block import BLOCK_TYPES, QK_K
from lowbit.weights.ggml.fields import Fields
from lowbit.weights.ggml.tensor import GGMLTensor
from lowbit.weights.ternary import TernaryWeight

TERNARY_TYPES = ("TQ1_0", "TQ2_0")
# The ggml type closest to each packing: 5 trits per byte is TQ1_0's encoding, 2 bits per code TQ2_0's.
TYPE_OF_PACKING = {"trit5": "TQ1_0", "2bit": "TQ2_0"}


def ggml_from_ternary(w: TernaryWeight, type_name: str | None = None) -> GGMLTensor:
    """w as TQ1_0 or TQ2_0 blocks (default: the type of its packing). Rows must be a multiple of 256."""
    name = type_name or TYPE_OF_PACKING[w.packing]
    if name not in TERNARY_TYPES:
        raise LowbitError(f"a ternary weight is stored as {' or '.join(TERNARY_TYPES)}, not {name}")
    rows, cols = w.shape
    if cols % QK_K:
        raise LowbitError(f"{name} needs rows whose length is a multiple of {QK_K}; got {cols} columns")
    q = w.codes().to(torch.int32).reshape(rows, cols // QK_K, 1, QK_K)
    d = w.scale.float().expand(rows, cols // QK_K)
    blocks = BLOCK_TYPES[name].pack(Fields(d, q)).reshape(rows, -1).contiguous()
    return GGMLTensor(blocks, name, w.shape, w.dtype)


def retype_ternary(g: GGMLTensor, type_name: str) -> GGMLTensor:
    """TQ1_0 blocks as TQ2_0 or back: the same d and codes per block, so the same values (lossless)."""
    if g.type not in TERNARY_TYPES or type_name not in TERNARY_TYPES:
        raise LowbitError(f"only {' and '.join(TERNARY_TYPES)} translate into each other, not {g.type} -> {type_name}")
    if g.type == type_name:
        return g
    rows = g.shape[0]
    src, dst = BLOCK_TYPES[g.type], BLOCK_TYPES[type_name]
    fields = src.unpack(g.data.reshape(rows, -1, src.type_size))
    return GGMLTensor(dst.pack(fields).reshape(rows, -1).contiguous(), type_name, g.shape, g.dtype)
