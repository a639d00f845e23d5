"""FP8Linear: W8A8-FP8 (vLLM's compressed-tensors FP8 schemes). The weight is FP8 codes [out, in] (E4M3,
or E5M2) with a float32 scale per output row or one per tensor; the input is quantised to E4M3 on the
fly, per token (each row's absmax / 448) or with one calibrated scale per tensor, and

    y[t, n] = (sum_k xq[t, k] * wq[n, k]) * sx[t] * sw[n] + bias[n]

with xq, wq the decoded FP8 values. backend "scaled_mm": torch._scaled_mm (row-wise scales, fp32 out)
where the build has it, E4M3 weights only; "emulated": the decoded values multiplied and accumulated in
float32 (every product of two FP8 values is exact in float32), then the same epilogue.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from lowbit.core import QuantizedTensor, QuantSpec
from lowbit.errors import LowbitError
from lowbit.nn.registry import register_module
from lowbit.weights.fp8 import ACT_MAX, FP8_FORMATS, FP8ActWeight, check_fp8_weight

BACKENDS = ("scaled_mm", "emulated")


@lru_cache(maxsize=None)
def scaled_mm_available() -> bool:
    """Whether torch._scaled_mm runs E4M3 x E4M3 with row-wise scales on this CPU build."""
    try:
        a = torch.ones(2, 16, dtype=torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 2), out_dtype=torch.float32)
        return True
    except (AttributeError, RuntimeError, ValueError, NotImplementedError):
        return False


def quantize_input(x2: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes [T, K], float32 scales [T, 1]) of x2 [T, K]: per token (absmax / 448; an all-zero row
    gets scale 1) or with the static per-tensor input_scale; values saturate at ±448."""
    x2 = x2.float()
    if input_scale is None:
        amax = x2.abs().amax(-1, keepdim=True)
        scale = torch.where(amax > 0, amax / ACT_MAX, torch.ones_like(amax))
    else:
        scale = input_scale.float().reshape(1, 1).expand(x2.shape[0], 1).contiguous()
    return torch.clamp(x2 / scale, -ACT_MAX, ACT_MAX).to(torch.float8_e4m3fn), scale


def fp8_matmul(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
               backend: str | None = None) -> torch.Tensor:
    """xq [T, K] E4M3 with scales sx [T, 1], wq [N, K] FP8 with scales sw [1, N]: float32 [T, N]."""
    backend = backend or ("scaled_mm" if scaled_mm_available() and wq.dtype == torch.float8_e4m3fn else "emulated")
    if backend not in BACKENDS:
        raise LowbitError(f"unknown FP8 matmul backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "scaled_mm":
        return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32)
    return (xq.float() @ wq.float().t()) * sx * sw


@register_module(FP8ActWeight)
class FP8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, format: str = "fp8_e4m3", granularity: str = "channel",
                 activation: str = "token", bias: bool = False):
        super().__init__()
        if format not in FP8_FORMATS or granularity not in ("channel", "tensor"):
            raise LowbitError(f"FP8Linear holds FP8 weights per channel or tensor, not {format} per {granularity}")
        self.in_features, self.out_features = in_features, out_features
        self.spec = QuantSpec(format, granularity, None, True, "fp32")
        self.activation = activation
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_FORMATS[format]))
        self.register_buffer("weight_scale", torch.ones(out_features if granularity == "channel" else 1))
        self.register_buffer("input_scale", torch.ones(()) if activation == "tensor" else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.backend: str | None = None   # None: scaled_mm where it runs, else emulated

    @classmethod
    def from_weight(cls, w: FP8ActWeight, bias: torch.Tensor | None = None, **options) -> "FP8Linear":
        q = check_fp8_weight(w.weight)
        out_features, in_features = q.shape
        m = cls(in_features, out_features, q.spec.format, q.spec.granularity, w.activation, bias is not None)
        m.weight.copy_(q.codes.view(m.weight.dtype))
        m.weight_scale.copy_(q.scale.reshape(-1).float())
        if m.input_scale is not None:
            m.input_scale.fill_(float(w.input_scale))
        if bias is not None:
            m.bias.data = bias.detach().float().clone()
        return m

    def quantized(self) -> FP8ActWeight:
        """The weight this module runs (what exporters read)."""
        scale = self.weight_scale.reshape(-1, 1).clone()
        q = QuantizedTensor(self.weight.view(torch.uint8).clone(), scale, torch.zeros_like(scale), self.spec)
        return FP8ActWeight(q, self.activation, None if self.input_scale is None else float(self.input_scale))

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        xq, sx = quantize_input(x2, self.input_scale)
        sw = self.weight_scale.reshape(1, -1).expand(1, self.out_features).contiguous()
        out = fp8_matmul(xq, sx, self.weight, sw, self.backend)
        out = out if self.bias is None else out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def layer_config(self) -> dict:
        return {"module": "FP8Linear", "in_features": self.in_features, "out_features": self.out_features,
                "format": self.spec.format, "granularity": self.spec.granularity, "activation": self.activation,
                "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, d: dict) -> "FP8Linear":
        return cls(d["in_features"], d["out_features"], d["format"], d["granularity"], d["activation"], d["bias"])

    def storage_bytes(self) -> int:
        tensors = [t for t in self._buffers.values() if t is not None] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        acts = "per-token dynamic" if self.activation == "token" else "per-tensor static"
        return (f"in={self.in_features}, out={self.out_features}, {self.spec.format} weights per "
                f"{self.spec.granularity}, fp8_e4m3 activations {acts}")
