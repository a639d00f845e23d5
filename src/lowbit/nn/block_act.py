"""BlockActLinear: an MX / NVFP4 weight with activations quantised to the same block format on the fly
(W4A4 NVFP4 and MXFP4, W8A8 MXFP8, W6A6 MXFP6; weights/block_act.py). The weight is held packed as
QuantLinear holds it (codes, E8M0 or E4M3 block scales, NVFP4's global scale G); NVFP4 adds the static
activation tensor scale `input_global_scale` G_x [1]. Per call, for x [..., K]:

    x̂ = decode(quantise(x))    blocks of 32 (MX) or 16 (NVFP4) along K, scales from each block's amax
                                 (core/qparams.py, the weights' rule; NVFP4's E4M3 scales under G_x)
    y = x̂ @ Ŵ^T + bias         in float32

The matmul is emulated: FP4 / MX tensor-core kernels (vLLM's cutlass / Marlin) do not run on a CPU.
"""
from __future__ import annotations

import torch

from lowbit.core import QuantSpec, mx, quantize
from lowbit.errors import LowbitError
from lowbit.nn.linear import QuantLinear
from lowbit.nn.registry import register_module
from lowbit.weights import BlockActWeight


def quantize_activations(x2: torch.Tensor, spec: QuantSpec, input_global_scale: torch.Tensor | None = None):
    """The QuantizedTensor of activations x2 [T, K] under the block `spec` (blocks along K); NVFP4 takes
    the calibrated tensor scale G_x [1]."""
    return quantize(x2.float(), spec, global_scale=input_global_scale)


@register_module(BlockActWeight)
class BlockActLinear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 has_g_idx: bool = False, compute_dtype: torch.dtype = torch.float32):
        if has_g_idx:
            raise LowbitError("block-format activations need contiguous weight blocks (no act-order group index)")
        super().__init__(in_features, out_features, spec, bias, False, compute_dtype)
        nv = spec.scale_dtype == mx.NV_SCALE
        self.register_buffer("input_global_scale", torch.ones(1) if nv else None)

    @classmethod
    def from_weight(cls, w: BlockActWeight, bias: torch.Tensor | None = None, **options) -> "BlockActLinear":
        m = cls.from_quantized(w.weight, None if bias is None else bias.float())
        if m.input_global_scale is not None:
            m.input_global_scale.fill_(float(w.input_global_scale))
        return m

    def quantized(self) -> BlockActWeight:
        """The weight this module runs (what exporters read)."""
        g = None if self.input_global_scale is None else float(self.input_global_scale)
        return BlockActWeight(super().quantized(), g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        xq = quantize_activations(x2, self.spec, self.input_global_scale).dequantize()
        out = xq @ self.dequantized_weight().float().T
        out = out if self.bias is None else out + self.bias.float()
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def layer_config(self) -> dict:
        return {**super().layer_config(), "module": "BlockActLinear"}

    @classmethod
    def from_layer_config(cls, d: dict) -> "BlockActLinear":
        return cls(d["in_features"], d["out_features"], QuantSpec.from_dict(d["spec"]), d["bias"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activations {self.spec.format} in blocks of {self.spec.group_size}"
