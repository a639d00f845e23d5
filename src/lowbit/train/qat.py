"""Quantisation-aware training: fake-quantised Linears trained with the straight-through estimator, then
converted to the same QuantizedTensor weights and modules as post-training quantisation.

FakeQuantLinear keeps the float weight (the "latent" weight the optimizer updates) and, for schemes with
float block scales (integer grids, NF4/FP4, FP8 ... with fp32/fp16/bf16 scales), learnable step sizes (LSQ,
Esser et al. 2020) initialised from min-max. In the forward pass the weight is rounded exactly as
`QuantizedTensor.dequantize` would decode it (the learned scale rounded to its storage dtype, the zero point
as stored), so the converted model computes what the trained one computed, bit for bit on the reference
path. MX and NVFP4 scales follow their format's rule from the block maximum (OCP MX v1.0, NVFP4), so for
those the scales are re-derived every step and only the weights learn.

Activations (optional): per-token dynamic int8 by absmax, with the STE; converted models then run W8A8
(int8 weights per channel only, the one activation scheme lowbit's modules run with integer weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.core import QuantizedTensor, QuantSpec, quantize
from lowbit.core.blocks import to_blocks
from lowbit.core.qparams import TORCH_FLOAT_DTYPES
from lowbit.errors import LowbitError
from lowbit.train.ste import fake_quant_affine

LEARNABLE_SCALE_DTYPES = ("fp32", "fp16", "bf16")
W8A8_SPEC = QuantSpec("int8", "channel", None, True, "fp32")   # lowbit.weights.int8.WEIGHT_SPEC
SCALE_FLOOR = 1e-8   # learned step sizes stay positive


@dataclass(frozen=True)
class QATSettings:
    """learn_scales: LSQ step sizes (else min-max scales re-derived from the weights every step);
    act_bits: fake-quantise each Linear's input per token (8, dynamic) or not (None)."""
    learn_scales: bool = True
    act_bits: int | None = None

    def check(self, spec: QuantSpec) -> None:
        if self.act_bits not in (None, 8):
            raise LowbitError(f"activation fake quantisation is int8 per token (--act-bits 8), not {self.act_bits}")
        if self.act_bits and spec != W8A8_SPEC:
            raise LowbitError("int8 activations convert to W8A8 modules, which hold int8 weights per channel with "
                              "fp32 scales: use --scheme int8-sfp32 with --act-bits 8")


def learnable(spec: QuantSpec) -> bool:
    """Whether the spec's block scales are free floats LSQ can learn (not MX's or NVFP4's rule-made ones)."""
    return spec.scale_dtype in LEARNABLE_SCALE_DTYPES


def _stored(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """The scale as stored (rounded to nearest at scale_dtype), with the identity gradient."""
    s = scale.clamp(min=SCALE_FLOOR)
    return s + (s.detach().to(TORCH_FLOAT_DTYPES[scale_dtype]).float() - s).detach()


def fake_quant_act_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic symmetric int8 (absmax / 127 per row of the last dim) with the STE; [..., in]."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True) / 127).clamp(min=SCALE_FLOOR)
    return fake_quant_affine(x, scale, 0.0, -127, 127)


def _check_init(init, spec: QuantSpec, linear: nn.Linear) -> QuantizedTensor:
    if not isinstance(init, QuantizedTensor) or init.spec != spec or init.g_idx is not None or \
            tuple(init.shape) != tuple(linear.weight.shape):
        raise LowbitError("QAT starts from a post-training weight of the same scheme and shape, with contiguous groups")
    return init


class FakeQuantLinear(nn.Module):
    """A Linear whose weight is fake-quantised under `spec` in every forward pass.

    weight [out, in] float32 (trainable), bias [out] or None, scale [rows, blocks] (a Parameter when
    learned), zero [rows, blocks] (a buffer: integer on the grid, or the implied zero when symmetric).
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, settings: QATSettings = QATSettings(),
                 init: QuantizedTensor | None = None):
        super().__init__()
        settings.check(spec)
        self.spec, self.settings = spec, settings
        self.in_features, self.out_features = linear.in_features, linear.out_features
        start = linear.weight.detach().float() if init is None else _check_init(init, spec, linear).dequantize()
        self.weight = nn.Parameter(start.float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())
        # min-max scales, or those of the post-training solution QAT starts from (its weights on its grid)
        q = quantize(self.weight.detach(), spec, "minmax") if init is None else init
        self.learn = settings.learn_scales and learnable(spec)
        if self.learn:
            self.scale = nn.Parameter(q.scale.clone())
        else:
            self.register_buffer("scale", q.scale.clone())
        self.register_buffer("zero", q.zero.clone())
        fmt = spec.number_format
        self._rounder = None if fmt.is_integer else fmt.round
        self._range = (fmt.min_value, fmt.max_value)
        block = self.weight.numel() // q.scale.numel()
        self._grad_factor = 1.0 / math.sqrt(block * max(abs(v) for v in self._range))   # LSQ's g

    def fake_weight(self) -> torch.Tensor:
        """The weight as the converted model will decode it: [out, in], differentiable by the STE."""
        if not self.learn:
            w = self.weight
            return w + (quantize(w.detach(), self.spec, "minmax").dequantize() - w).detach()
        blocks = to_blocks(self.weight, self.spec)
        scale = _stored(self.scale, self.spec.scale_dtype)[..., None]
        out = fake_quant_affine(blocks, scale, self.zero[..., None], *self._range, self._grad_factor, self._rounder)
        return out.reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.settings.act_bits:
            x = fake_quant_act_int8(x)
        return F.linear(x, self.fake_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quantized(self) -> QuantizedTensor:
        """The trained weight as a QuantizedTensor that decodes to exactly `fake_weight()`."""
        if not self.learn:
            return quantize(self.weight, self.spec, "minmax")
        blocks = to_blocks(self.weight, self.spec)
        scale = _stored(self.scale, self.spec.scale_dtype)
        codes = self.spec.number_format.encode(blocks / scale[..., None] + self.zero[..., None])
        return QuantizedTensor(codes=codes.reshape(self.weight.shape), scale=scale.clone(), zero=self.zero.clone(),
                               spec=self.spec, dtype=torch.float32)

    def extra_repr(self) -> str:
        scales = "learned (LSQ)" if self.learn else "min-max each step"
        acts = ", int8 activations per token" if self.settings.act_bits else ""
        return f"in={self.in_features}, out={self.out_features}, {self.spec.format}, scales {scales}{acts}"


# ---------------------------------------------------------------------------------------------------
# whole models

def prepare_qat(model: nn.Module, config_or_recipe, settings: QATSettings = QATSettings(),
                init: dict | None = None) -> list[str]:
    """Swap every Linear the recipe quantises (the same selection as post-training quantisation: the output
    head stays in full precision by default) for a FakeQuantLinear with that layer's scheme; freeze nothing.
    init: {name: QuantizedTensor} of a post-training solution to start from (weights and scales), else
    min-max round-to-nearest. Returns the swapped names; refuses, before any change, a scheme a layer's
    shape cannot take."""
    from lowbit.methods.recipe import as_recipe
    from lowbit.pipeline.loading import set_module
    from lowbit.pipeline.runner import layer_plan

    recipe = as_recipe(config_or_recipe)
    plan, _ = layer_plan(model, recipe)
    for config, _info in plan.values():
        settings.check(config.spec())
    for name, (config, _info) in plan.items():
        start = None if init is None else init.get(name)
        set_module(model, name, FakeQuantLinear(model.get_submodule(name), config.spec(), settings, start))
    model.lowbit_qat_recipe = recipe
    return list(plan)


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@torch.no_grad()
def convert_qat(model: nn.Module, description: str = "QAT") -> nn.Module:
    """Replace every FakeQuantLinear by the module nn/ builds for its QuantizedTensor (W8A8 when activations
    were fake-quantised), as `lowbit.quantize` leaves a model: recipe, per-layer report, description."""
    from lowbit.methods.recipe import Recipe
    from lowbit.nn import module_for
    from lowbit.pipeline.loading import set_module
    from lowbit.pipeline.report import layer_report
    from lowbit.weights.int8 import ActQuantWeight

    fakes = fake_quant_modules(model)
    if not fakes:
        raise LowbitError("the model holds no fake-quantised Linears (prepare_qat first)")
    recipe: Recipe = model.lowbit_qat_recipe
    reports = []
    for name, m in fakes.items():
        q = m.to_quantized()
        weight = ActQuantWeight(q, "token", None) if m.settings.act_bits else q
        bias = None if m.bias is None else m.bias.detach()
        set_module(model, name, module_for(weight, bias))
        reports.append(layer_report(name, recipe.config_for(name).short_name(), m.weight.detach(), weight, None))
    model.lowbit_recipe, model.lowbit_report, model.lowbit_calibration = recipe, reports, description
    del model.lowbit_qat_recipe
    return model


__all__ = ["QATSettings", "FakeQuantLinear", "fake_quant_act_int8", "learnable", "prepare_qat", "convert_qat",
           "fake_quant_modules"]
