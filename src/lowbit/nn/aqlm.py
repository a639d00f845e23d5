"""AQLMLinear: AQLM's weight (weights/codebook.py) held as stored, decoded by codebook lookups:

    y = x (scales ⊙ sum_m codebooks[m, codes[..., m]])^T + b

Buffers are the storage: the codes (uint8 for 2^8-entry codebooks, int16 for 2^16), the fp16 codebooks and
the fp16 row scales.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats.e8 import DIM
from lowbit.nn.registry import register_module
from lowbit.weights.codebook import AQLMWeight


@register_module(AQLMWeight)
class AQLMLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, codebooks: int, code_bits: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n_codebooks, self.code_bits, self.compute_dtype = codebooks, code_bits, compute_dtype
        dtype = torch.uint8 if code_bits == 8 else torch.int16
        self.register_buffer("codes", torch.zeros(out_features, in_features // DIM, codebooks, dtype=dtype))
        self.register_buffer("codebooks", torch.zeros(codebooks, 1 << code_bits, DIM, dtype=torch.float16))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, q: AQLMWeight, bias: torch.Tensor | None = None, **options) -> "AQLMLinear":
        out_features, in_features = q.shape
        m = cls(in_features, out_features, q.codebooks.shape[0], q.code_bits, bias is not None, q.dtype)
        m.codes.copy_(q.codes)
        m.codebooks.copy_(q.codebooks)
        m.scales.copy_(q.scales)
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def quantized(self) -> AQLMWeight:
        return AQLMWeight(self.codes.clone(), self.codebooks.clone(), self.scales.clone(), self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tuned = getattr(self, "_tuned", None)
        if tuned is not None:   # block fine-tuning: the same decode, differentiable in float32 masters
            books, scales = tuned
            idx = self.codes.long() & 0xFFFF
            w = sum(books[m][idx[..., m]] for m in range(books.shape[0])).reshape(self.out_features, -1)
            w = (w * scales[:, None]).to(x.dtype)
        else:
            w = self.quantized().dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def tuning_start(self) -> list[torch.Tensor]:
        """Block fine-tuning (pipeline/tuning.py): float32 copies of the codebooks and row scales that the
        forward pass uses, and trains, until tuning_end; the codes stay fixed."""
        self._tuned = (self.codebooks.float().requires_grad_(), self.scales.float().requires_grad_())
        return list(self._tuned)

    def tuning_end(self):
        """Store the tuned values, rounded to the stored fp16, and leave tuning; returns a function that
        puts back what was stored before."""
        books, scales = self._tuned
        before = (self.codebooks.clone(), self.scales.clone())
        self.codebooks.copy_(books.detach().half())
        self.scales.copy_(scales.detach().half())
        self._tuned = None

        def undo():
            self.codebooks.copy_(before[0])
            self.scales.copy_(before[1])
        return undo

    def layer_config(self) -> dict:
        return {"module": "AQLMLinear", "in_features": self.in_features, "out_features": self.out_features,
                "codebooks": self.n_codebooks, "code_bits": self.code_bits, "bias": self.bias is not None}

    @classmethod
    def from_layer_config(cls, d: dict) -> "AQLMLinear":
        return cls(d["in_features"], d["out_features"], d["codebooks"], d["code_bits"], d["bias"])

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, AQLM {self.n_codebooks}x{self.code_bits} "
                f"codebooks of {DIM}")
