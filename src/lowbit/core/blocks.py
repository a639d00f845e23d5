"""Views of a tensor as [rows, blocks per row, block size], the shape every scale computation works on."""
from __future__ import annotations

import torch

from lowbit.core.spec import QuantSpec
from lowbit.errors import LowbitError


def check_tensor(x: torch.Tensor, what: str = "tensor") -> None:
    """Reject what no quantiser can handle, with a message that names the problem."""
    if not isinstance(x, torch.Tensor):
        raise LowbitError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise LowbitError(f"{what} is empty (shape {tuple(x.shape)})")
    if not (x.is_floating_point()):
        raise LowbitError(f"{what} must be floating point, got {x.dtype}")
    if torch.isnan(x).any():
        raise LowbitError(f"{what} contains NaN")
    if torch.isinf(x).any():
        raise LowbitError(f"{what} contains Inf")


def block_shape(shape: torch.Size, spec: QuantSpec) -> tuple[int, int, int]:
    """(rows, blocks per row, elements per block) for a tensor of `shape` under `spec`."""
    numel = 1
    for d in shape:
        numel *= d
    if spec.granularity == "tensor":
        return 1, 1, numel
    if len(shape) < 2 and spec.granularity in ("channel", "token"):
        raise LowbitError(f"per-{spec.granularity} quantisation needs at least 2 dims, got shape {tuple(shape)}")
    if spec.granularity == "channel":
        return shape[0], 1, numel // shape[0]
    cols = shape[-1]
    rows = numel // cols
    if spec.granularity == "token":
        return rows, 1, cols
    g = spec.group_size
    if cols % g:
        raise LowbitError(f"group size {g} does not divide the row length {cols} (shape {tuple(shape)})")
    return rows, cols // g, g


def to_blocks(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return x.reshape(block_shape(x.shape, spec))


def from_blocks(blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return blocks.reshape(shape)
