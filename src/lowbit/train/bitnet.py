"""BitNet b1.58 training: BitLinear with the straight-through estimator, from scratch or by conversion.

Source: Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", and the authors'
"Training Tips, Code and FAQ" (2024). In training a BitLinear keeps a float master weight W and computes

    y = Q_a(x) @ Q_w(W).T,   Q_w(W) = gamma * RoundClip(W / gamma, -1, 1), gamma = mean |W|   (absmean)
                             Q_a(x) = round(x * s) / s per token, s = 127 / max |x|            (int8 absmax)

and the backward pass treats both roundings as the identity (STE, train.ste.fake_quant_grid), as the
authors' code does (`w + (weight_quant(w) - w).detach()`). The quantisers are the ones inference uses
(methods/bitnet.py for weights, kernels/ternary.py for activations), so the trained model converts to real
ternary weights (TernaryLinear) that compute what BitLinear computed, up to float rounding order.

As in the paper, only the Linears of the decoder blocks become BitLinear; embeddings, the output head and
the norms stay in float. The Llama architecture is otherwise unchanged, so llama.cpp runs the result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.ternary import quantize_tokens_int8
from lowbit.methods.bitnet import BitNet, absmean_scale, absmean_ternary, ternary_codes
from lowbit.nn.registry import module_for
from lowbit.train.ste import fake_quant_grid


def ternary_values(w: torch.Tensor) -> torch.Tensor:
    """gamma * RoundClip(w / gamma, -1, 1) with gamma = absmean_scale(w) (the float16-rounded scale stored)."""
    gamma = absmean_scale(w)
    return ternary_codes(w, gamma).to(w.dtype) * gamma.to(w.dtype)


def int8_values(x: torch.Tensor) -> torch.Tensor:
    """round(x * s) / s per token (last dim), s = 127 / max |x| (kernels.ternary.quantize_tokens_int8)."""
    xq, s = quantize_tokens_int8(x)
    return (xq.float() / s).to(x.dtype)


class BitLinear(nn.Linear):
    """The training BitLinear: a float master weight, ternary weights and int8 activations in the forward
    pass, identity gradients through both (STE). Shapes as nn.Linear: x [..., in] -> [..., out]."""

    packing: str = "trit5"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_grid(self.weight, ternary_values)
        return F.linear(fake_quant_grid(x, int8_values), w, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, packing: str = "trit5") -> "BitLinear":
        """A BitLinear sharing `linear`'s weight and bias tensors (so optimisers and checkpoints see the same
        parameter names)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features, m.packing = linear.in_features, linear.out_features, packing
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def ternary(self) -> nn.Module:
        """The inference module holding real ternary weights (TernaryLinear, chosen by nn's registry)."""
        w = absmean_ternary(self.weight.detach().float(), self.packing)
        return module_for(w, None if self.bias is None else self.bias.detach().float())


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """{name: Linear} of every Linear inside the decoder blocks (not the embeddings or the output head)."""
    from lowbit.pipeline.arch import block_list, describe

    path, blocks = block_list(model, describe(model))
    return {f"{path}.{i}.{n}": m for i, block in enumerate(blocks) for n, m in block.named_modules()
            if isinstance(m, nn.Linear)}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def to_bitnet(model: nn.Module, packing: str = "trit5") -> nn.Module:
    """Replace every decoder-block Linear of `model` by a BitLinear on the same weights, in place."""
    BitNet(packing=packing)   # checks the packing
    linears = block_linears(model)
    if not linears:
        raise LowbitError("the model has no Linear layers in its decoder blocks to turn into BitLinear")
    for name, lin in linears.items():
        if not isinstance(lin, BitLinear):
            _swap(model, name, BitLinear.from_linear(lin, packing))
    return model


def to_ternary(model: nn.Module) -> nn.Module:
    """Replace every BitLinear by its TernaryLinear (real ternary weights), in place; the model then records
    the recipe `bitnet` so that a native save, `lowbit eval` and the exporters know what it holds."""
    from lowbit.methods.recipe import Recipe

    found = {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}
    if not found:
        raise LowbitError("the model has no BitLinear layers to convert")
    for name, m in found.items():
        _swap(model, name, m.ternary())
    model.lowbit_recipe = Recipe(BitNet(packing=next(iter(found.values())).packing))
    return model
