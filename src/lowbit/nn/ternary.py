"""TernaryLinear: BitNet b1.58's linear layer at inference (Ma et al. 2024, "The Era of 1-bit LLMs").

The weight is held as it is stored (weights/ternary.py): ternary codes packed 5 per byte (or 2 bits each)
and one float16 absmean scale gamma. The input is quantised to int8 per token by absmax, multiplied with the
codes in integer arithmetic (kernels/ternary.py: additions and subtractions only in the reference, an exact
float32 matmul on the fast path) and rescaled by gamma / s:  y = (xq @ codes.T) * gamma / s + bias.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.ternary import bitlinear, ternary_matmul
from lowbit.nn.registry import register_module
from lowbit.weights.ternary import PACKINGS, TernaryWeight, packed_size, unpack_ternary


@register_module(TernaryWeight)
class TernaryLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, packing: str = "trit5", bias: bool = False,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if packing not in PACKINGS:
            raise LowbitError(f"unknown ternary packing {packing!r}; known: {', '.join(PACKINGS)}")
        self.in_features, self.out_features, self.packing = in_features, out_features, packing
        self.compute_dtype = compute_dtype
        self.register_buffer("packed", torch.zeros(packed_size(in_features * out_features, packing), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones((), dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.matmul = ternary_matmul      # kernels.ternary.ternary_matmul_reference gives the same integers

    @classmethod
    def from_weight(cls, w: TernaryWeight, bias: torch.Tensor | None = None, **options) -> "TernaryLinear":
        out_features, in_features = w.shape
        m = cls(in_features, out_features, w.packing, bias is not None, w.dtype)
        m.packed.copy_(w.packed)
        m.scale.copy_(w.scale)
        if bias is not None:
            m.bias.data = bias.detach().clone().float()
        return m

    def quantized(self) -> TernaryWeight:
        return TernaryWeight(self.packed, self.scale, torch.Size([self.out_features, self.in_features]), self.packing,
                             self.compute_dtype)

    def codes(self) -> torch.Tensor:
        """int8 [out, in] in {-1, 0, +1}."""
        n = self.in_features * self.out_features
        return unpack_ternary(self.packed, n, self.packing).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = bitlinear(x, self.codes(), self.scale, self.bias, self.matmul)
        return y.to(x.dtype)

    def layer_config(self) -> dict:
        """What the native format records to rebuild this module empty before loading its buffers."""
        return {"module": "TernaryLinear", "in_features": self.in_features, "out_features": self.out_features,
                "packing": self.packing, "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, d: dict) -> "TernaryLinear":
        return cls(d["in_features"], d["out_features"], d["packing"], d["bias"])

    def storage_bytes(self) -> int:
        return self.packed.numel() + 2 + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, packing={self.packing}, bias={self.bias is not None}"
