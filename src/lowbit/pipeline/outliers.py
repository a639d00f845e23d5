"""An outlier test-bed: a variant of a model whose Linears see "emergent" outlier channels.

Large LLMs grow a few hidden dimensions 20-100x larger than the rest (Dettmers et al., LLM.int8();
Xiao et al., SmoothQuant), which is what breaks per-tensor and per-token int8 activations. A small
model trained briefly has none, so this module plants them without changing the model's function:
for a few channels j, the producer of a Linear group's input is multiplied by `factor` in channel j
and the group's weight columns j are divided by it (pipeline/fold.py, with s_j = 1 / factor).

The producers are the norms in front of attention and MLP (so q/k/v and gate/up read hidden channels
`channels`), and, through attention and the gated MLP, v_proj and up_proj (so o_proj and down_proj read
channels `inner_channels` of their own width). The residual stream itself is left alone: scaling it
would change what an RMSNorm divides by. The full-precision logits agree with the original to float
rounding; the activations entering the Linears carry max|x| about `factor` times larger in those channels.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.pipeline.arch import block_list, describe
from lowbit.pipeline.blocks import block_linears
from lowbit.pipeline.fold import foldable_groups, fold_scales
from lowbit.pipeline.loading import conv1d_to_linear

DEFAULT_CHANNELS = (7, 61, 133, 202)     # 4 of 256 hidden channels, about the share seen in OPT-6.7B
DEFAULT_FACTOR = 50.0


def _check(channels, factor: float, width: int, where: str) -> list[int]:
    if not (isinstance(factor, (int, float)) and 0 < factor < float("inf")):
        raise LowbitError(f"outlier factor must be a finite positive number, got {factor!r}")
    if any(int(c) < 0 for c in channels):
        raise LowbitError(f"outlier channels must be non-negative indices, got {list(channels)} for {where}")
    return sorted({int(c) % width for c in channels})


def outlier_scale(width: int, channels, factor: float) -> torch.Tensor:
    """The folded scale: s_j = 1/factor on the outlier channels (the producer is divided by s), else 1."""
    s = torch.ones(width, dtype=torch.float64)
    s[list(channels)] = 1.0 / factor
    return s


def make_outlier_variant(model: nn.Module, channels=DEFAULT_CHANNELS, factor: float = DEFAULT_FACTOR,
                         inner_channels=None, inplace: bool = False) -> nn.Module:
    """A copy of `model` (or the model itself, inplace=True) with outlier channels planted in every block.

    channels: indices into the width of each norm-fed group's input (taken modulo that width);
    inner_channels: the same for groups fed by a preceding Linear (o_proj, down_proj); None reuses
    `channels`; () plants none there. Channels are in the producer's space: under GQA a v_proj channel
    shows up in every o_proj column that reads it. Returns the model, with `lowbit_outliers` recording
    what was planted.
    """
    if not inplace:
        model = copy.deepcopy(model)
    conv1d_to_linear(model)  # GPT-2's transposed Conv1D Linears, as the quantisation pipeline sees them
    arch = describe(model)
    _, blocks = block_list(model, arch)
    inner = channels if inner_channels is None else inner_channels
    planted = []
    for i, block in enumerate(blocks):
        linears = block_linears(block)
        for group, source in foldable_groups(block, arch, list(linears)):
            wanted = channels if source.kind == "norm" else inner
            if not len(wanted):
                continue
            chans = _check(wanted, factor, source.width, f"{source.name} of block {i}")
            fold_scales(source, [linears[n] for n in group], outlier_scale(source.width, chans, factor))
            planted.append({"block": i, "producer": source.name, "group": list(group), "channels": chans})
    if not planted:
        raise LowbitError(f"no foldable Linear groups in this {arch.family} model: cannot plant outliers")
    model.lowbit_outliers = {"factor": float(factor), "planted": planted}
    return model
