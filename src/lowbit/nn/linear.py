"""QuantLinear: a Linear whose weight is held packed (codes + scales + zeros) and dequantised on the fly.

The buffers are the real storage, so the model's measured footprint is what quantisation promises:
an int4 g128 weight takes 4 bits per code plus one fp16 scale per 128 codes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantizedTensor, QuantSpec, block_shape, mx, pack_bits, unpack_bits
from lowbit.core.qparams import TORCH_FLOAT_DTYPES
from lowbit.formats import get_format
from lowbit.kernels.dequant import dequantize_int_packed
from lowbit.kernels.fused import Plan, affine_plan
from lowbit.nn.fast import FastPath
from lowbit.nn.registry import register_module

_SCALE_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def store_scales(scale: torch.Tensor, spec: QuantSpec, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Scales as stored: E8M0 codes (e8m0, mx), E4M3 block scales (nv, given the tensor's G), or floats."""
    if spec.scale_dtype == "e8m0":
        return get_format("e8m0").encode(scale)
    if spec.scale_dtype == mx.MX_SCALE:
        return mx.mx_scale_codes(scale, spec.number_format)
    if spec.scale_dtype == mx.NV_SCALE:
        return mx.nv_recover_block_scales(scale, global_scale)
    return scale.to(_SCALE_TORCH_DTYPES[spec.scale_dtype])


def load_scales(stored: torch.Tensor, spec: QuantSpec, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    if spec.scale_dtype == "e8m0":
        return get_format("e8m0").decode(stored)
    if spec.scale_dtype == mx.MX_SCALE:
        return mx.mx_scale_values(stored, spec.number_format)
    if spec.scale_dtype == mx.NV_SCALE:
        return stored.float() / global_scale.float()
    return stored.float()


def _scale_buffer_dtype(scale_dtype: str) -> torch.dtype:
    return {"e8m0": torch.uint8, "mx": torch.uint8, "nv": torch.float8_e4m3fn}.get(
        scale_dtype) or _SCALE_TORCH_DTYPES[scale_dtype]


@register_module(QuantizedTensor)
class QuantLinear(FastPath, nn.Module):
    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 has_g_idx: bool = False, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.compute_dtype = compute_dtype
        rows, groups, _ = block_shape(torch.Size([out_features, in_features]), spec)
        n = in_features * out_features
        self.register_buffer("qweight", torch.zeros((n * spec.bits + 7) // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(rows, groups, dtype=_scale_buffer_dtype(spec.scale_dtype)))
        # NVFP4's FP32 tensor scale G (a divisor, as compressed-tensors stores it)
        self.register_buffer("global_scale", torch.ones(1) if spec.scale_dtype == mx.NV_SCALE else None)
        if spec.symmetric:
            self.zeros = None
        elif spec.float_zero:
            self.register_buffer("zeros", torch.zeros(rows, groups, dtype=TORCH_FLOAT_DTYPES[spec.zero_dtype]))
        else:
            self.register_buffer("zeros", torch.zeros((rows * groups * spec.bits + 7) // 8, dtype=torch.uint8))
        # None (no buffer) unless groups are not contiguous; assigning None first would block the buffer.
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if has_g_idx else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, bias: torch.Tensor | None = None) -> "QuantLinear":
        out_features, in_features = q.shape
        m = cls(in_features, out_features, q.spec, bias is not None, q.g_idx is not None, q.dtype)
        m.qweight.copy_(pack_bits(q.codes, q.spec.bits))
        if m.global_scale is not None:
            m.global_scale.copy_(q.extras["global_scale"].reshape(1))
        m.scales.copy_(store_scales(q.scale, q.spec, m.global_scale))
        if m.zeros is not None and q.spec.float_zero:
            m.zeros.copy_(q.zero)
        elif m.zeros is not None:
            m.zeros.copy_(pack_bits(q.zero.to(torch.int64) - q.spec.number_format.qmin, q.spec.bits))
        if q.g_idx is not None:
            m.g_idx.copy_(q.g_idx.to(torch.int32))
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    @classmethod
    def from_weight(cls, q: QuantizedTensor, bias: torch.Tensor | None = None, **options) -> "QuantLinear":
        return cls.from_quantized(q, bias)

    def quantized(self) -> QuantizedTensor:
        """The QuantizedTensor this module holds (what exporters read)."""
        shape = torch.Size([self.out_features, self.in_features])
        codes = unpack_bits(self.qweight, self.spec.bits, shape.numel()).reshape(shape)
        scale = load_scales(self.scales, self.spec, self.global_scale)
        extras = {} if self.global_scale is None else {"global_scale": self.global_scale.clone()}
        return QuantizedTensor(codes, scale, self._zero_levels(scale), self.spec, self.compute_dtype, self.g_idx,
                               extras)

    def dequantized_weight(self) -> torch.Tensor:
        if self.spec.number_format.is_integer and self.g_idx is None:
            shape = torch.Size([self.out_features, self.in_features])
            scale = load_scales(self.scales, self.spec, self.global_scale)
            return dequantize_int_packed(self.qweight, self.spec, shape, scale, self._zero_levels(scale))
        return self.quantized().dequantize()

    def _zero_levels(self, scale: torch.Tensor) -> torch.Tensor:
        if self.zeros is None:
            return torch.full_like(scale, self.spec.implied_zero)
        if self.spec.float_zero:
            return self.zeros.float()
        zero = unpack_bits(self.zeros, self.spec.bits, scale.numel()).reshape(scale.shape).float()
        return zero + self.spec.number_format.qmin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fast_forward(x)
        return self.python_forward(x) if y is None else y

    def python_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path: the whole weight dequantised, then torch's matmul in x's dtype."""
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    GPU_PLANS = True

    def build_plan(self, make=affine_plan) -> Plan | None:
        """The packed buffers as the fused kernels read them (see lowbit.kernels.fused.affine_plan)."""
        spec, n, k = self.spec, self.out_features, self.in_features
        fmt = spec.number_format
        if (not fmt.is_integer or self.g_idx is not None) and self.compute_dtype is not torch.float32:
            return None   # the Python path rounds these weights to compute_dtype first
        group = {"channel": k, "tensor": k, "group": spec.group_size}.get(spec.granularity)
        if group is None:
            return None
        coded = spec.scale_dtype in ("e8m0", mx.MX_SCALE, mx.NV_SCALE)   # stored as codes, not floats
        scales = load_scales(self.scales, spec, self.global_scale) if coded else self.scales
        zeros = self.zeros
        if spec.granularity == "tensor":   # one scale: spread over the rows
            zeros = None if zeros is None else self._zero_levels(load_scales(self.scales, spec, self.global_scale)).expand(n, 1)
            scales = scales.expand(n, 1)
        levels = fmt.table.float() - (spec.implied_zero if spec.symmetric else 0.0)
        codes, columns = self.qweight, None
        if self.g_idx is not None:
            codes, columns = self._act_order_codes()
            if codes is None:
                return None
        plan = make(codes, spec.bits, n, k, group, levels, scales, zeros, float(fmt.qmin) if fmt.is_integer
                           else 0.0, (1 if fmt.signed else 2) if spec.bits == 8 and fmt.is_integer else 0)
        if plan is not None:
            plan.columns = columns
        return plan

    def _act_order_codes(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(codes with the columns sorted by group, that column order), when every group has group_size
        columns; a runtime copy of the codes (not saved), so act-order weights take their codes twice."""
        k, gs, bits = self.in_features, self.spec.group_size, self.spec.bits
        g = self.g_idx.long()
        columns = torch.argsort(g, stable=True)
        if gs is None or not torch.equal(g[columns], torch.arange(k) // gs):
            return None, None
        codes = unpack_bits(self.qweight, bits, self.out_features * k).reshape(self.out_features, k)
        return pack_bits(codes[:, columns], bits), columns

    def layer_config(self) -> dict:
        """What the native format records to rebuild this module empty before loading its tensors."""
        return {"module": "QuantLinear", "in_features": self.in_features, "out_features": self.out_features,
                "spec": self.spec.to_dict(), "bias": self.bias is not None, "g_idx": self.g_idx is not None}

    @classmethod
    def from_layer_config(cls, d: dict) -> "QuantLinear":
        return cls(d["in_features"], d["out_features"], QuantSpec.from_dict(d["spec"]), d["bias"], d["g_idx"])

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        s = self.spec
        g = f", group_size={s.group_size}" if s.group_size else ""
        return f"in={self.in_features}, out={self.out_features}, format={s.format}{g}, symmetric={s.symmetric}"
