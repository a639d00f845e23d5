"""The tensor-level API: quantise a 2-D weight to ggml blocks, read blocks back, and the quantised weight.

imatrix: optional importance per column (llama.cpp's imatrix: mean squared input activation).
search:  False = what llama-quantize writes; True (default) = its candidates and more, best per block
         (see legacy.py and kquants.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.weights.ggml import kquants, legacy, tquants  # noqa: F401  (defining the type classes registers them)
from lowbit.weights.ggml.block import BLOCK_TYPES, GGML_TYPES, BlockType
from lowbit.weights.ggml.fields import Fields

# Rows per chunk are chosen so that a chunk holds about this many weights: the candidate searches
# materialise [weights x candidates] tensors, so this bounds memory at a few hundred MB.
CHUNK_ELEMENTS = 1 << 18

# Unquantised storage types: (ggml_type, torch dtype).
PLAIN_TYPES: dict[str, tuple[int, torch.dtype]] = {
    name: (GGML_TYPES[name][0], dtype)
    for name, dtype in (("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16))}

GGML_TYPE_NAMES: dict[int, str] = {GGML_TYPES[name][0]: name for name in (*BLOCK_TYPES, *PLAIN_TYPES)}

# llama.cpp's substitutes when a row length does not divide the block (tensor_type_fallback).
FALLBACK_TYPES = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
                  "TQ1_0": "Q4_0", "TQ2_0": "Q4_0"}


def canonical_type(name: str) -> str:
    upper = str(name).upper()
    if upper not in BLOCK_TYPES and upper not in PLAIN_TYPES:
        known = ", ".join(list(BLOCK_TYPES) + list(PLAIN_TYPES))
        raise LowbitError(f"unknown ggml type {name!r}; known: {known}")
    return upper


def block_size(type_name: str) -> int:
    return GGML_TYPES[canonical_type(type_name)][1]


def row_nbytes(type_name: str, cols: int) -> int:
    """Bytes of one row of `cols` weights."""
    t = canonical_type(type_name)
    _check_cols(t, cols)
    _, size, nbytes = GGML_TYPES[t]
    return cols // size * nbytes


def bits_per_weight(type_name: str) -> float:
    t = canonical_type(type_name)
    return 8 * row_nbytes(t, block_size(t)) / block_size(t)


def fit_type(type_name: str, cols: int) -> str:
    """The type llama.cpp would store a row of `cols` weights in when asked for `type_name`."""
    t = canonical_type(type_name)
    if cols % block_size(t):
        t = FALLBACK_TYPES.get(t, t)
        if cols % block_size(t):
            t = "F16"
    return t


def _check_cols(t: str, cols: int) -> None:
    if cols % block_size(t):
        raise LowbitError(f"{t} needs rows whose length is a multiple of {block_size(t)}; got {cols} columns")


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise LowbitError(f"ggml quantisation takes a 2-D tensor [rows, columns], got "
                          f"{getattr(weight, 'shape', type(weight).__name__)}")
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise LowbitError("weight contains NaN or infinite values")
    return w


def _check_importance(imatrix, cols: int) -> torch.Tensor | None:
    if imatrix is None:
        return None
    qw = torch.as_tensor(imatrix).detach().float().reshape(-1)
    if qw.numel() != cols:
        raise LowbitError(f"importance vector has {qw.numel()} entries for a weight with {cols} columns")
    if not torch.isfinite(qw).all() or (qw < 0).any():
        raise LowbitError("importance vector must be finite and non-negative")
    return qw


def quantize_ggml(weight: torch.Tensor, type_name: str, imatrix=None, search: bool = True) -> np.ndarray:
    """Quantise a 2-D weight [rows, cols] to ggml blocks: uint8 [rows, row_nbytes(type, cols)].

    imatrix: optional importance per column (llama.cpp's imatrix: mean squared input activation).
    search: see the module docstring (False = what llama-quantize writes).
    """
    w = _check_weight(weight)
    t = canonical_type(type_name)
    rows, cols = w.shape
    if t in PLAIN_TYPES:
        return w.to(PLAIN_TYPES[t][1]).contiguous().view(torch.uint8).reshape(rows, -1).numpy().copy()
    _check_cols(t, cols)
    return _quantize_blocks(w, BLOCK_TYPES[t], _check_importance(imatrix, cols), search)


def _quantize_blocks(w: torch.Tensor, bt: type[BlockType], qw: torch.Tensor | None, search: bool) -> np.ndarray:
    """Chunks of rows at a time (CHUNK_ELEMENTS), each as x [rows, nb, nsub, sub]."""
    rows, cols = w.shape
    nb, sub = cols // bt.block_size, bt.block_size // bt.nsub
    out = np.empty((rows, nb * bt.type_size), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        x = w[r0:r0 + step].reshape(-1, nb, bt.nsub, sub)
        q = None if qw is None else qw.reshape(1, nb, bt.nsub, sub).expand_as(x)
        fields = bt.quantize(x, q, search)
        out[r0:r0 + step] = bt.pack(fields).reshape(x.shape[0], -1).numpy()
    return out


def _as_bytes(data) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    if t.dtype != torch.uint8:
        raise LowbitError(f"ggml data must be uint8 bytes, got {t.dtype}")
    return t


def unpack_ggml(data, type_name: str) -> Fields:
    """The fields of a [rows, row bytes] block tensor (for inspection and tests)."""
    bt = BLOCK_TYPES[canonical_type(type_name)]
    b = _as_bytes(data)
    if b.dim() != 2 or b.shape[1] % bt.type_size:
        raise LowbitError(f"{bt.name} data must be [rows, k*{bt.type_size}] bytes, got {tuple(b.shape)}")
    return bt.unpack(b.reshape(b.shape[0], -1, bt.type_size))


def dequantize_ggml(data, type_name: str, cols: int | None = None) -> torch.Tensor:
    """ggml blocks uint8 [rows, row bytes] -> float32 [rows, cols], the values ggml computes."""
    t = canonical_type(type_name)
    b = _as_bytes(data)
    if b.dim() != 2:
        raise LowbitError(f"ggml data must be 2-D [rows, row bytes], got {tuple(b.shape)}")
    if t in PLAIN_TYPES:
        dtype = PLAIN_TYPES[t][1]
        out = b.contiguous().view(dtype).float()
    else:
        out = unpack_ggml(b, t).values().reshape(b.shape[0], -1)
    if cols is not None and out.shape[1] != cols:
        raise LowbitError(f"{t} data of {b.shape[1]} bytes per row holds {out.shape[1]} weights, expected {cols}")
    return out


@dataclass
class GGMLTensor:
    """A weight held as ggml blocks: what a GGUF file stores for it, byte for byte."""

    data: torch.Tensor          # uint8 [rows, row bytes]
    type: str                   # "Q4_K", "Q8_0", "F16", ...
    shape: torch.Size           # [rows, cols] of the weight
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def storage_bits(self) -> int:
        return 8 * self.nbytes

    @property
    def bits_per_element(self) -> float:
        return self.storage_bits / self.numel

    def dequantize(self) -> torch.Tensor:
        return dequantize_ggml(self.data, self.type, self.shape[1]).to(self.dtype)


def quantize_to_tensor(weight: torch.Tensor, type_name: str, imatrix=None, search: bool = True) -> GGMLTensor:
    data = torch.from_numpy(quantize_ggml(weight, type_name, imatrix, search))
    return GGMLTensor(data, canonical_type(type_name), torch.Size(weight.shape), weight.dtype)
