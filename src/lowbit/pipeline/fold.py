"""Folding per-channel scales into a model without changing what it computes.

A group of Linears that read the same input x can take x / s if their weights take the columns W * s:
(x / s) (W diag(s))^T = x W^T. The division is folded into the op that produces x, so nothing is added
at run time: a norm (its weight, and bias if any, divided by s) or a preceding Linear (its output rows
and bias divided by s). Exact in real arithmetic; in float it moves outputs by a few ulps.

The scale lives in the producer's channels. Under grouped-query attention v_proj has fewer output
channels than o_proj has inputs: each key/value head is read by several query heads, so one v channel
feeds several o_proj columns and `index` maps every consumer column to its producer channel.

Only ops that commute with a positive per-channel scale are folded through: a norm's affine output,
attention (linear in V), a gated MLP's up branch (act(gate) * up is linear in up) — the Arch lists these
as `linear_prev` — and ReLU (homogeneous). GELU or SiLU between two Linears does not commute, so such a
pair is not folded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.pipeline.arch import Arch, sequential_groups

_HOMOGENEOUS_ACTIVATIONS = (nn.ReLU,)
_IDENTITY_IN_EVAL = (nn.Dropout, nn.Identity)


@dataclass
class InputSource:
    """Where a group's input comes from, and how its channels map onto the group's input columns."""

    kind: str                      # "norm" or "linear"
    name: str                      # module name inside the block
    module: nn.Module
    width: int                     # producer channels
    index: torch.Tensor | None     # int64 [consumer columns] -> producer channel; None: identity
    norm_offset: float = 0.0       # Gemma's RMSNorm multiplies by (1 + weight)

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """A producer-space vector as the consumer's input columns see it."""
        return s if self.index is None else s[self.index]


def _child(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _parent(block: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return block.get_submodule(parent_name) if parent_name else block


def _homogeneous_activation(block: nn.Module, producer: str) -> bool:
    """Whether every activation next to the producer commutes with a positive scale (ReLU)."""
    acts = [m for m in _parent(block, producer).children()
            if not isinstance(m, (nn.Linear, *_IDENTITY_IN_EVAL)) and not list(m.parameters())
            and not list(m.children())]
    return bool(acts) and all(isinstance(a, _HOMOGENEOUS_ACTIVATIONS) for a in acts)


def _head_dim(block: nn.Module, consumer: str) -> int | None:
    attn = _parent(block, consumer)
    hd = getattr(attn, "head_dim", None) or getattr(getattr(attn, "config", None), "head_dim", None)
    return int(hd) if hd else None


def _consumer_index(block: nn.Module, producer: nn.Linear, consumer: str, columns: int) -> torch.Tensor | None:
    """None when the producer's channels are the consumer's columns; the GQA repetition map otherwise."""
    width = producer.out_features
    if columns == width:
        return None
    hd = _head_dim(block, consumer)
    if not hd or columns % width or width % hd:
        raise LowbitError(f"cannot map {columns} input columns of {consumer} onto {width} producer channels")
    n_rep = columns // width
    c = torch.arange(columns)
    head, within = c // hd, c % hd
    return (head // n_rep) * hd + within


def input_source(block: nn.Module, arch: Arch, group: list[str] | tuple[str, ...]) -> InputSource | None:
    """The foldable producer of a group's input, or None when there is none (or none that commutes)."""
    first = group[0]
    consumer = _child(block, first)
    if consumer is None:
        return None
    if first in arch.norms:
        norm = _child(block, arch.norms[first])
        if norm is None or getattr(norm, "weight", None) is None or norm.weight.shape[0] != consumer.in_features:
            return None
        return InputSource("norm", arch.norms[first], norm, norm.weight.shape[0], None, arch.norm_offset)
    if first in arch.prev:
        producer = _child(block, arch.prev[first])
        commutes = first in arch.linear_prev or _homogeneous_activation(block, arch.prev[first])
        if not isinstance(producer, nn.Linear) or not commutes:
            return None
        try:
            index = _consumer_index(block, producer, first, consumer.in_features)
        except LowbitError:
            return None
        return InputSource("linear", arch.prev[first], producer, producer.out_features, index)
    return None


@torch.no_grad()
def divide_output_channels(source: InputSource, s: torch.Tensor) -> None:
    """The producer's output channel j divided by s_j."""
    m = source.module
    w = m.weight
    s = s.to(torch.float64)
    if source.kind == "norm":
        effective = w.double() + source.norm_offset
        w.copy_((effective / s - source.norm_offset).to(w.dtype))
    else:
        w.copy_((w.double() / s[:, None]).to(w.dtype))
    bias = getattr(m, "bias", None)
    if bias is not None:
        bias.copy_((bias.double() / s).to(bias.dtype))


@torch.no_grad()
def multiply_input_columns(linears: list[nn.Linear], s_columns: torch.Tensor) -> None:
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * s_columns.double()).to(lin.weight.dtype))


def fold_scales(source: InputSource, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide the producer's channels by s (producer space, all positive) and scale the consumers'
    input columns up to match, so the block computes the same function."""
    s = s.detach().reshape(-1)
    if s.numel() != source.width:
        raise LowbitError(f"a scale of {s.numel()} channels cannot fold into {source.name} ({source.width} channels)")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise LowbitError(f"scales folded into {source.name} must be finite and positive")
    divide_output_channels(source, s)
    multiply_input_columns(linears, source.expand(s))


def foldable_groups(block: nn.Module, arch: Arch, linear_names: list[str]) -> list[tuple[list[str], InputSource]]:
    """The block's groups of Linears (execution order) whose shared input can take a folded scale."""
    out = []
    for group in sequential_groups(arch, linear_names):
        source = input_source(block, arch, group)
        if source is not None:
            out.append((group, source))
    return out
