"""Linear4bit: a Linear whose weight is held in bitsandbytes' NF4/FP4 layout and dequantised on the fly.

The buffers are the storage (packed codes, absmax, and the second level when double-quantised), so the
model's measured footprint is the 4.5 (or ~4.127) bits per weight the scheme promises. Each forward
decodes the weight in float32, rounds it once to the compute dtype (bf16 by default, as bnb does) and
multiplies there; the output comes back in the input's dtype. The weight never takes gradients: it is
the frozen base QLoRA trains adapters on (lowbit.train.qlora).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels.fused import Plan, affine_plan
from lowbit.nn.fast import FastPath
from lowbit.nn.registry import register_module
from lowbit.weights.bnb4 import (COMPUTE_DTYPES, DTYPE_NAMES, NESTED_BLOCK_SIZE, Quantized4bit, check_block_size,
                                 check_quant_type, code_table, dynamic_map)

_WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@register_module(Quantized4bit)
class Linear4bit(FastPath, nn.Module):
    def __init__(self, in_features: int, out_features: int, quant_type: str = "nf4", block_size: int = 64,
                 double_quant: bool = False, bias: bool = False, compute_dtype: torch.dtype = torch.bfloat16,
                 weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type = check_quant_type(quant_type)
        self.block_size = check_block_size(block_size)
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype  # the dtype of the weight that was quantised (bnb's quant_state.dtype)
        n = in_features * out_features
        n_blocks = _ceil_div(n, block_size)
        self.register_buffer("qweight", torch.zeros(_ceil_div(n, 2), dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8 if double_quant else torch.float32))
        if double_quant:
            self.register_buffer("nested_absmax", torch.zeros(_ceil_div(n_blocks, NESTED_BLOCK_SIZE)))
            self.register_buffer("nested_offset", torch.zeros(()))
        else:
            self.nested_absmax = self.nested_offset = None
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, q: Quantized4bit, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        out_features, in_features = q.shape
        m = cls(in_features, out_features, q.quant_type, q.block_size, q.double_quant, bias is not None,
                compute_dtype, q.dtype)
        m.qweight.copy_(q.packed)
        m.absmax.copy_(q.absmax)
        if q.double_quant:
            m.nested_absmax.copy_(q.nested_absmax)
            m.nested_offset.copy_(q.nested_offset)
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    @classmethod
    def from_weight(cls, q: Quantized4bit, bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16, **options) -> "Linear4bit":
        return cls.from_quantized(q, bias, compute_dtype)

    def quantized(self) -> Quantized4bit:
        """The Quantized4bit this module holds (what exporters read)."""
        return Quantized4bit(self.qweight, self.absmax, torch.Size([self.out_features, self.in_features]),
                             self.block_size, self.quant_type, self.weight_dtype, self.nested_absmax,
                             self.nested_offset)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.quantized().dequantize(dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fast_forward(x, self.compute_dtype)
        return self.python_forward(x) if y is None else y

    GPU_PLANS = True

    def build_plan(self, make=affine_plan) -> Plan | None:
        """The bnb blocks as the fused kernels read them: 4-bit codes (high nibble first) of the format's
        16 levels, one absmax per block; rows must hold whole blocks."""
        if self.in_features % self.block_size:
            return None
        dq = (dynamic_map(), self.nested_absmax, self.nested_offset) if self.double_quant else None
        return make(self.qweight, 4, self.out_features, self.in_features, self.block_size,
                           code_table(self.quant_type), self.absmax, hi_first=True, bnb_double_quant=dq)

    def python_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path: the whole weight dequantised to compute_dtype, then torch's matmul."""
        w = self.dequantized_weight(torch.float32).to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), w, bias).to(x.dtype)

    def storage_bytes(self) -> int:
        tensors = [t for t in self._buffers.values() if t is not None]
        if self.bias is not None:
            tensors.append(self.bias)
        return sum(t.numel() * t.element_size() for t in tensors)

    def layer_config(self) -> dict:
        """What the native format records to rebuild this module empty before loading its tensors."""
        return {"module": "Linear4bit", "in_features": self.in_features, "out_features": self.out_features,
                "quant_type": self.quant_type, "block_size": self.block_size, "double_quant": self.double_quant,
                "bias": self.bias is not None, "compute_dtype": DTYPE_NAMES[self.compute_dtype],
                "weight_dtype": str(self.weight_dtype).removeprefix("torch.")}

    @classmethod
    def from_layer_config(cls, d: dict) -> "Linear4bit":
        return cls(d["in_features"], d["out_features"], d["quant_type"], d["block_size"], d["double_quant"],
                   d["bias"], COMPUTE_DTYPES[d["compute_dtype"]], _WEIGHT_DTYPES[d.get("weight_dtype", "float32")])

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in={self.in_features}, out={self.out_features}, {self.quant_type}, block_size={self.block_size}"
                f"{dq}, compute_dtype={DTYPE_NAMES[self.compute_dtype]}")
