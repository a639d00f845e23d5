"""Memory footprint of a model as held: parameters and buffers, shared storage counted once.

A quantised Linear is any module with a `storage_bytes()` method (QuantLinear and its kin in lowbit.nn);
its own accounting is trusted, and its tensors are kept out of "the rest".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MemoryReport:
    total_bytes: int                  # every tensor as held
    quantized_linear_bytes: int       # sum of storage_bytes() of the quantised Linears
    quantized_linears: int            # how many there are
    quantized_weight_params: int      # their weight elements (in x out)
    quantized_bias_bytes: int         # bias bytes inside quantized_linear_bytes
    quantized_linear_fp16_bytes: int  # the same Linears (weight + bias) stored at fp16
    other_bytes: int                  # every other tensor as held
    other_float_elements: int         # floating-point elements among the other weights (state-dict tensors)
    other_nonfloat_bytes: int         # integer / bool weights among them, as held

    def other_bytes_at(self, float_bytes: int) -> int:
        """The other weights with their floating-point elements stored at `float_bytes` each."""
        return self.other_float_elements * float_bytes + self.other_nonfloat_bytes

    def deployed_bytes(self, float_bytes: int = 2) -> int:
        """The report's memory convention: quantised Linears as held, the other weights at fp16."""
        return self.quantized_linear_bytes + self.other_bytes_at(float_bytes)

    @property
    def bits_per_weight(self) -> float | None:
        """Bits of the quantised Linears' weight storage (codes, scales, zeros, extras; bias excluded)
        per weight element; None when the model holds no quantised Linear."""
        if not self.quantized_weight_params:
            return None
        return 8 * (self.quantized_linear_bytes - self.quantized_bias_bytes) / self.quantized_weight_params

    @property
    def quantized_linear_ratio(self) -> float | None:
        """Quantised Linears as held / the same Linears at fp16."""
        if not self.quantized_linear_fp16_bytes:
            return None
        return self.quantized_linear_bytes / self.quantized_linear_fp16_bytes

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(bits_per_weight=self.bits_per_weight, quantized_linear_ratio=self.quantized_linear_ratio)
        return d


def is_quantized_linear(module: nn.Module) -> bool:
    return callable(getattr(module, "storage_bytes", None))


def outermost_quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Quantised Linears by name; one nested inside another (a wrapper) counts as part of the outer."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if is_quantized_linear(module) and not any(name.startswith(p + ".") or p == "" for p in found):
            found[name] = module
    return found


def _storages(module: nn.Module) -> dict[int, torch.Tensor]:
    """One representative tensor per distinct storage held by `module` (parameters and buffers)."""
    out: dict[int, torch.Tensor] = {}
    for t in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
        out.setdefault(t.untyped_storage().data_ptr(), t)
    return out


def _storage_elements(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() // t.element_size()


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def model_memory(model: nn.Module) -> MemoryReport:
    quantized = outermost_quantized_linears(model)
    inside = {ptr for m in quantized.values() for ptr in _storages(m)}
    others = {ptr: t for ptr, t in _storages(model).items() if ptr not in inside}
    q_bytes = sum(int(m.storage_bytes()) for m in quantized.values())
    weight_params = sum(getattr(m, "in_features", 0) * getattr(m, "out_features", 0) for m in quantized.values())
    biases = [b for b in (getattr(m, "bias", None) for m in quantized.values()) if isinstance(b, torch.Tensor)]
    bias_bytes = sum(_tensor_bytes(b) for b in biases)
    bias_elements = sum(b.numel() for b in biases)
    other_bytes = sum(t.untyped_storage().nbytes() for t in others.values())
    # Weights are what the model's state dict holds; non-persistent buffers (rotary inv_freq) are derived
    # at load time and do not count toward the stored size.
    saved = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    weights = [t for ptr, t in others.items() if ptr in saved]
    float_elements = sum(_storage_elements(t) for t in weights if t.is_floating_point())
    nonfloat_bytes = sum(t.untyped_storage().nbytes() for t in weights if not t.is_floating_point())
    return MemoryReport(
        total_bytes=q_bytes + other_bytes, quantized_linear_bytes=q_bytes, quantized_linears=len(quantized),
        quantized_weight_params=weight_params, quantized_bias_bytes=bias_bytes,
        quantized_linear_fp16_bytes=2 * (weight_params + bias_elements), other_bytes=other_bytes,
        other_float_elements=float_elements, other_nonfloat_bytes=nonfloat_bytes)
