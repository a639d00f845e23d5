"""The ggml type table and the block-type registry.

Every block type is one class (legacy.py, kquants.py) holding its field choice, pack and unpack side by
side; defining it with `type_name=` registers it in BLOCK_TYPES, as gguf-py's quants.py does:

    class Q4_K(AffineK, type_name="Q4_K"): ...

Its ggml type id, block size and bytes per block come from the one table GGML_TYPES.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from lowbit.errors import LowbitError
from lowbit.weights.ggml.fields import Fields

QK_K = 256

# name -> (ggml_type, weights per block, bytes per block): gguf-py's GGML_QUANT_SIZES with the type ids.
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "BF16": (30, 1, 2),
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q2_K": (10, QK_K, 84), "Q3_K": (11, QK_K, 110), "Q4_K": (12, QK_K, 144), "Q5_K": (13, QK_K, 176),
    "Q6_K": (14, QK_K, 210), "TQ1_0": (34, QK_K, 54), "TQ2_0": (35, QK_K, 66),
}

# name -> the registered block-type class, in the table's order whatever the order of registration.
BLOCK_TYPES: dict[str, type[BlockType]] = {}


def _register(cls: type[BlockType]) -> None:
    registered = {**BLOCK_TYPES, cls.name: cls}
    BLOCK_TYPES.clear()
    BLOCK_TYPES.update((name, registered[name]) for name in GGML_TYPES if name in registered)


class BlockType:
    """One ggml block type, used as the class itself (never instantiated).

    quantize: (x [R, nb, nsub, sub] float32, qw (importance, same shape) or None, search) -> Fields
    pack:     Fields -> uint8 [R, nb, type_size]
    unpack:   uint8 [R, nb, type_size] -> Fields
    A subclass without `type_name` is a family sharing a quantiser; it is not registered.
    """

    name: ClassVar[str]
    type_id: ClassVar[int]            # ggml_type
    block_size: ClassVar[int]
    type_size: ClassVar[int]          # bytes per block
    bits_per_weight: ClassVar[float]
    nsub: ClassVar[int] = 1           # sub-blocks per block

    def __init_subclass__(cls, type_name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if type_name is None:
            return
        if type_name in BLOCK_TYPES or type_name not in GGML_TYPES:
            raise LowbitError(f"cannot register ggml block type {type_name!r}")
        cls.name = type_name
        cls.type_id, cls.block_size, cls.type_size = GGML_TYPES[type_name]
        cls.bits_per_weight = 8 * cls.type_size / cls.block_size
        _register(cls)

    def __init__(self):
        raise TypeError("block types are used as classes, not instances")

    @classmethod
    def quantize(cls, x: torch.Tensor, qw: torch.Tensor | None, search: bool) -> Fields:
        raise NotImplementedError

    @classmethod
    def pack(cls, f: Fields) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def unpack(cls, b: torch.Tensor) -> Fields:
        raise NotImplementedError
