"""Memory calculators: weights at a given precision, and the KV cache.

GB = 1e9 bytes, GiB = 2**30 bytes; both are printed because vendors and tools disagree on which to use.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass

from lowbit.errors import LowbitError

GB = 1e9
GIB = 2**30

# Storage bits per element of the plain precisions.
PRECISION_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "fp6": 6, "int4": 4,
                  "nf4": 4, "fp4": 4, "int3": 3, "int2": 2, "ternary": 1.58}

# Precisions of the default weight table: (label, element bits, group size or None, scale bits per group).
DEFAULT_WEIGHT_ROWS = [
    ("fp32", 32, None, 0), ("fp16", 16, None, 0), ("int8", 8, None, 0),
    ("int4", 4, None, 0), ("int4-g128", 4, 128, 16), ("nf4-b64", 4, 64, 32),
    ("int3-g128", 3, 128, 16), ("int2", 2, None, 0),
]


@dataclass
class MemoryRow:
    precision: str
    bits_per_weight: float
    bytes: float
    gb: float
    gib: float


def bits_per_weight(bits: float, group_size: int | None = None, scale_bits: int = 16, zero_bits: int = 0) -> float:
    """Element bits plus the per-group scale (and zero point) overhead, e.g. int4 g128 fp16 = 4.125."""
    if bits <= 0:
        raise LowbitError(f"bits must be positive, got {bits}")
    if group_size is None:
        return float(bits)
    if group_size < 1:
        raise LowbitError(f"group size must be positive, got {group_size}")
    return bits + (scale_bits + zero_bits) / group_size


def weight_memory(params: float, bits: float, group_size: int | None = None,
                  scale_bits: int = 16, zero_bits: int = 0, label: str | None = None) -> MemoryRow:
    if not (params > 0 and math.isfinite(params)):
        raise LowbitError(f"parameter count must be a positive finite number, got {params}")
    bpw = bits_per_weight(bits, group_size, scale_bits, zero_bits)
    nbytes = params * bpw / 8
    return MemoryRow(label or f"{bits}-bit", bpw, nbytes, nbytes / GB, nbytes / GIB)


def weight_table(params: float) -> list[MemoryRow]:
    return [weight_memory(params, bits, g, s, label=name) for name, bits, g, s in DEFAULT_WEIGHT_ROWS]


@dataclass
class KVCacheSize:
    layers: int
    kv_heads: int
    head_dim: int
    seq_len: int
    batch: int
    dtype: str
    bits_per_element: float
    bytes: float
    gb: float
    gib: float


def kv_cache_memory(layers: int, kv_heads: int, head_dim: int, seq_len: int, batch: int = 1,
                    dtype: str = "fp16") -> KVCacheSize:
    """2 (K and V) x layers x kv_heads x head_dim x seq_len x batch x bytes per element.

    kv_heads is the number of key/value heads: smaller than the query heads under grouped-query attention.
    """
    for name, v in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                    ("seq_len", seq_len), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise LowbitError(f"{name} must be a positive integer, got {v!r}")
    if dtype not in PRECISION_BITS:
        raise LowbitError(f"unknown dtype {dtype!r}; known: {', '.join(PRECISION_BITS)}")
    bits = PRECISION_BITS[dtype]
    nbytes = 2 * layers * kv_heads * head_dim * seq_len * batch * bits / 8
    return KVCacheSize(layers, kv_heads, head_dim, seq_len, batch, dtype, bits, nbytes, nbytes / GB, nbytes / GIB)


def as_dict(row) -> dict:
    return asdict(row)
