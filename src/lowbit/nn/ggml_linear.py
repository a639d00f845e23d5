"""GGMLLinear: a Linear whose weight is held as llama.cpp ggml blocks and dequantised on the fly.

The buffer is exactly what a GGUF file stores for the tensor (same bytes, same row order as the
Hugging Face weight), so the measured footprint is the file's, and exporting is a copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels.fused import Plan, ggml_plan
from lowbit.nn.fast import FastPath
from lowbit.nn.registry import register_module
from lowbit.weights.ggml import BLOCK_TYPES, GGML_TYPES, GGMLTensor, canonical_type, dequantize_ggml, row_nbytes


@register_module(GGMLTensor)
class GGMLLinear(FastPath, nn.Module):
    def __init__(self, in_features: int, out_features: int, type_name: str, bias: bool = False,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.type = canonical_type(type_name)
        self.compute_dtype = compute_dtype
        self.register_buffer("blocks", torch.zeros(out_features, row_nbytes(self.type, in_features), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_tensor(cls, qt: GGMLTensor, bias: torch.Tensor | None = None) -> "GGMLLinear":
        out_features, in_features = qt.shape
        m = cls(in_features, out_features, qt.type, bias is not None, qt.dtype)
        m.blocks.copy_(qt.data)
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    @classmethod
    def from_weight(cls, qt: GGMLTensor, bias: torch.Tensor | None = None, **options) -> "GGMLLinear":
        return cls.from_tensor(qt, bias)

    def quantized(self) -> GGMLTensor:
        return GGMLTensor(self.blocks, self.type, torch.Size([self.out_features, self.in_features]), self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_ggml(self.blocks, self.type, self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fast_forward(x)
        return self.python_forward(x) if y is None else y

    def build_plan(self) -> Plan | None:
        """Block types run in the fused kernels (F16/F32/BF16 rows keep the Python path)."""
        if self.type not in BLOCK_TYPES or self.compute_dtype is not torch.float32:
            return None
        return ggml_plan(self.blocks, GGML_TYPES[self.type][0], self.out_features, self.in_features)

    def python_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path: the whole weight dequantised, then torch's matmul in x's dtype."""
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def layer_config(self) -> dict:
        """What the native format records to rebuild this module empty before loading its buffers."""
        return {"module": "GGMLLinear", "in_features": self.in_features, "out_features": self.out_features,
                "type": self.type, "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, d: dict) -> "GGMLLinear":
        return cls(d["in_features"], d["out_features"], d["type"], d["bias"])

    def storage_bytes(self) -> int:
        return self.blocks.numel() + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, type={self.type}, bias={self.bias is not None}"
