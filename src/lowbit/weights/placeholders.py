"""Placeholder weights: the type, scheme and shapes a method will produce for a Linear, with no values
(zero codes, unit scales, broadcast views that take no memory). Exporters and engine checks read them
before any calibration, to refuse a recipe a target cannot serve before work is spent on it."""
from __future__ import annotations

import torch

from lowbit.core import QuantizedTensor, QuantSpec, block_shape
from lowbit.weights.bnb4 import NESTED_BLOCK_SIZE, Quantized4bit
from lowbit.weights.ggml import GGMLTensor, row_nbytes


def free(shape, dtype, value=0) -> torch.Tensor:
    """A tensor of `shape` filled with `value` that allocates one element (sizes count it whole)."""
    return torch.full((1,), value, dtype=dtype).expand(*shape)


_free = free


def affine(shape: torch.Size, spec: QuantSpec, g_idx: bool = False) -> QuantizedTensor:
    rows, groups, _ = block_shape(torch.Size(shape), spec)
    zero = spec.implied_zero if spec.symmetric else float(getattr(spec.number_format, "qmin", 0))
    codes = _free(shape, torch.uint8)
    index = torch.zeros(shape[-1], dtype=torch.int32) if g_idx else None
    return QuantizedTensor(codes, _free((rows, groups), torch.float32, 1.0), _free((rows, groups), torch.float32, zero),
                           spec, g_idx=index)


def bnb4(shape: torch.Size, block_size: int, quant_type: str, double_quant: bool) -> Quantized4bit:
    n = torch.Size(shape).numel()
    blocks = -(-n // block_size)
    q = Quantized4bit(_free((-(-n // 2),), torch.uint8), _free((blocks,), torch.float32, 1.0), torch.Size(shape),
                      block_size, quant_type)
    if double_quant:
        q.absmax = _free((blocks,), torch.uint8)
        q.nested_absmax = _free((-(-blocks // NESTED_BLOCK_SIZE),), torch.float32, 1.0)
        q.nested_offset = torch.zeros(())
    return q


def ggml(shape: torch.Size, type_name: str) -> GGMLTensor:
    rows, cols = shape
    return GGMLTensor(_free((rows, row_nbytes(type_name, cols)), torch.uint8), type_name, torch.Size(shape))
