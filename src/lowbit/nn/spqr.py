"""SpQRLinear: SpQR's weight held as stored (weights/sparse.py) and run as a dense dequantised base product
plus a sparse product with the fp16 outlier corrections:

    y = x W_base^T + x S^T + b        W_base = (codes - zero[g]) * scale[g],  S: CSR [out, in]

Buffers are the storage: packed base codes, the packed second-level codes of scales and zeros with their
fp16 second-level scales and zeros, the CSR arrays (int32 row pointers, int16 columns, fp16 values) and
g_idx (int16) when columns were visited in act-order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantizedTensor, QuantSpec, pack_bits, packed_nbytes, unpack_bits
from lowbit.nn.registry import register_module
from lowbit.weights.sparse import SpQRWeight


def _stat_spec(bits: int, group: int) -> QuantSpec:
    return QuantSpec(f"uint{bits}", "group", group, False, "fp16", "fp16")


@register_module(SpQRWeight)
class SpQRLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, stat_bits: int,
                 stat_group: int, n_outliers: int, bias: bool = False, has_g_idx: bool = False,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.stat_bits, self.stat_group = bits, group_size, stat_bits, stat_group
        self.compute_dtype = compute_dtype
        n_groups, n_stat = in_features // group_size, out_features // stat_group
        self.register_buffer("qweight", torch.zeros(packed_nbytes(out_features * in_features, bits), dtype=torch.uint8))
        for stat in ("scale", "zero"):
            self.register_buffer(f"{stat}_codes", torch.zeros(packed_nbytes(n_groups * out_features, stat_bits),
                                                             dtype=torch.uint8))
            self.register_buffer(f"{stat}_scale", torch.zeros(n_groups, n_stat, dtype=torch.float16))
            self.register_buffer(f"{stat}_zero", torch.zeros(n_groups, n_stat, dtype=torch.float16))
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("col_idx", torch.zeros(n_outliers, dtype=torch.int16))
        self.register_buffer("values", torch.zeros(n_outliers, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int16) if has_g_idx else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, q: SpQRWeight, bias: torch.Tensor | None = None, **options) -> "SpQRLinear":
        out_features, in_features = q.shape
        m = cls(in_features, out_features, q.bits, q.group_size, q.scale.spec.bits, q.scale.spec.group_size,
                q.n_outliers, bias is not None, q.g_idx is not None, q.dtype)
        m.qweight.copy_(pack_bits(q.codes, q.bits))
        for stat, t in (("scale", q.scale), ("zero", q.zero)):
            getattr(m, f"{stat}_codes").copy_(pack_bits(t.codes, t.spec.bits))
            getattr(m, f"{stat}_scale").copy_(t.scale)
            getattr(m, f"{stat}_zero").copy_(t.zero)
        m.row_ptr.copy_(q.row_ptr)
        m.col_idx.copy_(q.col_idx)
        m.values.copy_(q.values)
        if q.g_idx is not None:
            m.g_idx.copy_(q.g_idx.to(torch.int16))
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def _stat(self, stat: str) -> QuantizedTensor:
        n_groups = self.in_features // self.group_size
        codes = unpack_bits(getattr(self, f"{stat}_codes"), self.stat_bits, n_groups * self.out_features)
        return QuantizedTensor(codes.reshape(n_groups, self.out_features), getattr(self, f"{stat}_scale").float(),
                               getattr(self, f"{stat}_zero").float(), _stat_spec(self.stat_bits, self.stat_group))

    def quantized(self) -> SpQRWeight:
        """The SpQRWeight this module holds."""
        codes = unpack_bits(self.qweight, self.bits, self.out_features * self.in_features)
        g_idx = None if self.g_idx is None else self.g_idx.to(torch.int32)
        return SpQRWeight(codes.reshape(self.out_features, self.in_features), self._stat("scale"), self._stat("zero"),
                          self.row_ptr.clone(), self.col_idx.clone(), self.values.clone(), self.bits,
                          self.group_size, g_idx, self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense equivalent: base plus outliers."""
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantized()
        y = F.linear(x, q.base().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y + q.sparse_matmul(x).to(y.dtype) if q.n_outliers else y

    def layer_config(self) -> dict:
        return {"module": "SpQRLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "stat_bits": self.stat_bits,
                "stat_group": self.stat_group, "n_outliers": int(self.values.numel()), "bias": self.bias is not None,
                "g_idx": self.g_idx is not None}

    @classmethod
    def from_layer_config(cls, d: dict) -> "SpQRLinear":
        return cls(d["in_features"], d["out_features"], d["bits"], d["group_size"], d["stat_bits"], d["stat_group"],
                   d["n_outliers"], d["bias"], d["g_idx"])

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, uint{self.bits} g{self.group_size}, statistics "
                f"uint{self.stat_bits} g{self.stat_group}, {self.values.numel()} fp16 outliers")
