"""Linears that multiply in int8: W8A8Linear (SmoothQuant-style W8A8) and Int8MixedLinear (LLM.int8()).

Both hold the weight as int8 codes [out, in] with one float32 scale per output row (symmetric,
w ≈ code * scale), quantise their input to int8 on the fly, multiply with int32 accumulation
(lowbit.kernels.int8) and apply the scales in a float epilogue:

    y[t, n] = acc[t, n] * sx[t] * sw[n] + bias[n]

W8A8Linear's activation scale is per token (dynamic: each row's absmax / 127) or per tensor (static: one
scale calibrated on the calibration set). Int8MixedLinear (Dettmers et al., 2022) quantises X per row and
W per output row ("vector-wise"), but first takes out every input column in which some |x| reaches the
threshold: those columns are multiplied in float32 with the same int8 weight columns dequantised (as
bitsandbytes does when the weight is stored in int8), and the fraction of columns so kept is counted.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.core import QuantizedTensor
from lowbit.errors import LowbitError
from lowbit.kernels.int8 import int8_matmul, quantize_rows, quantize_with_scale
from lowbit.nn.registry import register_module
from lowbit.weights.int8 import ACTIVATIONS, WEIGHT_SPEC, ActQuantWeight, MixedInt8Weight, check_int8_weight


class _Int8WeightLinear(nn.Module):
    """The int8 weight, its per-row scales and the bias, shared by both modules."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.backend: str | None = None  # None: lowbit.kernels.int8 picks per device

    def _load_weight(self, q: QuantizedTensor, bias: torch.Tensor | None) -> None:
        check_int8_weight(q)
        self.weight.copy_(q.codes.view(torch.int8))
        self.weight_scale.copy_(q.scale.reshape(-1).float())
        if bias is not None:
            self.bias.data = bias.detach().float().clone()

    def int8_weight(self) -> QuantizedTensor:
        """The int8 weight as a QuantizedTensor."""
        scale = self.weight_scale[:, None].clone()
        return QuantizedTensor(self.weight.view(torch.uint8).clone(), scale, torch.zeros_like(scale), WEIGHT_SPEC)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def _epilogue(self, acc: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        out = acc.float() * (x_scale[..., None] * self.weight_scale)
        return out if self.bias is None else out + self.bias

    def storage_bytes(self) -> int:
        tensors = [t for t in self._buffers.values() if t is not None]
        if self.bias is not None:
            tensors.append(self.bias)
        return sum(t.numel() * t.element_size() for t in tensors)


@register_module(ActQuantWeight)
class W8A8Linear(_Int8WeightLinear):
    def __init__(self, in_features: int, out_features: int, activation: str = "token", bias: bool = False):
        super().__init__(in_features, out_features, bias)
        if activation not in ACTIVATIONS:
            raise LowbitError(f"activation quantisation must be 'token' (dynamic) or 'tensor' (static), "
                              f"got {activation!r}")
        self.activation = activation
        if activation == "tensor":
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
        else:
            self.input_scale = None

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, bias: torch.Tensor | None = None, activation: str = "token",
                       input_scale: float | torch.Tensor | None = None) -> "W8A8Linear":
        out_features, in_features = q.shape
        m = cls(in_features, out_features, activation, bias is not None)
        m._load_weight(q, bias)
        if activation == "tensor":
            if input_scale is None or not float(input_scale) > 0:
                raise LowbitError("static (per-tensor) activation quantisation needs a positive calibrated input scale")
            m.input_scale.fill_(float(input_scale))
        return m

    @classmethod
    def from_weight(cls, w: ActQuantWeight, bias: torch.Tensor | None = None, **options) -> "W8A8Linear":
        return cls.from_quantized(w.weight, bias, w.activation, w.input_scale)

    def quantized(self) -> ActQuantWeight:
        """The weight this module runs (what exporters read)."""
        scale = None if self.input_scale is None else float(self.input_scale)
        return ActQuantWeight(self.int8_weight(), self.activation, scale)

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [T, K], float32 scales [T]) of the flattened input."""
        if self.activation == "token":
            return quantize_rows(x2)
        return quantize_with_scale(x2, self.input_scale), self.input_scale.expand(x2.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        codes, x_scale = self.quantize_input(x2)
        out = self._epilogue(int8_matmul(codes, self.weight, self.backend), x_scale)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def layer_config(self) -> dict:
        return {"module": "W8A8Linear", "in_features": self.in_features, "out_features": self.out_features,
                "activation": self.activation, "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, d: dict) -> "W8A8Linear":
        return cls(d["in_features"], d["out_features"], d["activation"], d["bias"])

    def extra_repr(self) -> str:
        acts = "per-token dynamic" if self.activation == "token" else "per-tensor static"
        return f"in={self.in_features}, out={self.out_features}, int8 weights per channel, int8 activations {acts}"


@register_module(MixedInt8Weight)
class Int8MixedLinear(_Int8WeightLinear):
    def __init__(self, in_features: int, out_features: int, threshold: float = 6.0, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        if not threshold >= 0:
            raise LowbitError(f"the outlier threshold must be >= 0 (0: no decomposition), got {threshold!r}")
        self.threshold = float(threshold)
        self.reset_outlier_count()

    @classmethod
    def from_quantized(cls, q: QuantizedTensor, bias: torch.Tensor | None = None,
                       threshold: float = 6.0) -> "Int8MixedLinear":
        out_features, in_features = q.shape
        m = cls(in_features, out_features, threshold, bias is not None)
        m._load_weight(q, bias)
        return m

    @classmethod
    def from_weight(cls, w: MixedInt8Weight, bias: torch.Tensor | None = None, **options) -> "Int8MixedLinear":
        return cls.from_quantized(w.weight, bias, w.threshold)

    def quantized(self) -> MixedInt8Weight:
        """The weight this module runs (what exporters read)."""
        return MixedInt8Weight(self.int8_weight(), self.threshold)

    def reset_outlier_count(self) -> None:
        self.columns_seen = 0          # input columns over all forward calls
        self.outlier_columns_seen = 0  # of which multiplied in floating point

    @property
    def outlier_fraction(self) -> float:
        return self.outlier_columns_seen / self.columns_seen if self.columns_seen else 0.0

    def outlier_columns(self, x2: torch.Tensor) -> torch.Tensor:
        """Indices of the input columns in which some |x| reaches the threshold."""
        if self.threshold == 0:
            return torch.empty(0, dtype=torch.int64, device=x2.device)
        return torch.nonzero((x2.abs() >= self.threshold).any(0)).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        cols = self.outlier_columns(x2)
        regular = x2
        if cols.numel():
            regular = x2.clone()
            regular[:, cols] = 0.0  # the int8 part sees the other columns only (their row absmax too)
        codes, x_scale = quantize_rows(regular)
        out = self._epilogue(int8_matmul(codes, self.weight, self.backend), x_scale)
        if cols.numel():
            w_cols = self.weight[:, cols].float() * self.weight_scale[:, None]
            out = out + x2[:, cols] @ w_cols.T
        self.columns_seen += self.in_features
        self.outlier_columns_seen += int(cols.numel())
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def layer_config(self) -> dict:
        return {"module": "Int8MixedLinear", "in_features": self.in_features, "out_features": self.out_features,
                "threshold": self.threshold, "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, d: dict) -> "Int8MixedLinear":
        return cls(d["in_features"], d["out_features"], d["threshold"], d["bias"])

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int8 vector-wise, columns with |x| >= "
                f"{self.threshold:g} in float")


def outlier_fraction(model: nn.Module) -> float:
    """Over every Int8MixedLinear forward since the last reset: the fraction of input columns multiplied
    in floating point."""
    mods = [m for m in model.modules() if isinstance(m, Int8MixedLinear)]
    seen = sum(m.columns_seen for m in mods)
    return sum(m.outlier_columns_seen for m in mods) / seen if seen else 0.0


def reset_outlier_counts(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Int8MixedLinear):
            m.reset_outlier_count()
