"""QuipLinear: QuIP#'s weight (weights/codebook.py) run in the rotated basis, the transforms applied to the
activations instead of the weight:

    y = rht_inverse(rht(x, su) Ŵr^T, sv) + b        Ŵr decoded from the codes by table lookup

Buffers are the storage: the int16 E8P codes, the residual codes (uint8 or int16; empty at 2 bits), the
signs packed one bit each, and the fp32 scale; with finer blocks (QuIP(plus=...)) also their residual
codes and the blocks' marks, packed one bit each. Block fine-tuning (pipeline/tuning.py) trains the signs as
real numbers, as QuIP#'s fine-tuning does (its SU / SV): they are then stored as fp16 vectors
(`real_signs`), the transforms becoming H D(su) and D(sv) H^T with real diagonals.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import pack_bits, packed_nbytes, unpack_bits
from lowbit.core.hadamard import rht, rht_inverse
from lowbit.formats.e8 import DIM
from lowbit.nn.registry import register_module
from lowbit.weights.codebook import QuipWeight

RESID_DTYPES = {2: torch.int16, 3: torch.uint8, 4: torch.int16}


def _signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    return 1 - 2 * unpack_bits(packed, 1, n).float()


@register_module(QuipWeight)
class QuipLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, resid_scale: float, bias: bool = False,
                 compute_dtype: torch.dtype = torch.float32, real_signs: bool = False, finer_blocks: int = 0,
                 resid_scale_hi: float = 1.0):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.resid_scale = in_features, out_features, bits, resid_scale
        self.compute_dtype, self.real_signs = compute_dtype, real_signs
        self.finer_blocks, self.resid_scale_hi = finer_blocks, resid_scale_hi
        blocks = in_features // DIM
        self.register_buffer("codes", torch.zeros(out_features, blocks, dtype=torch.int16))
        lo = blocks - finer_blocks if bits > 2 else 0
        self.register_buffer("resid", torch.zeros(out_features, lo, dtype=RESID_DTYPES[bits]))
        if finer_blocks:
            self.register_buffer("hi", torch.zeros(packed_nbytes(blocks, 1), dtype=torch.uint8))
            self.register_buffer("resid_hi", torch.zeros(out_features, finer_blocks, dtype=RESID_DTYPES[bits + 1]))
        if real_signs:
            self.register_buffer("su", torch.ones(in_features, dtype=torch.float16))
            self.register_buffer("sv", torch.ones(out_features, dtype=torch.float16))
        else:
            self.register_buffer("su", torch.zeros(packed_nbytes(in_features, 1), dtype=torch.uint8))
            self.register_buffer("sv", torch.zeros(packed_nbytes(out_features, 1), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, q: QuipWeight, bias: torch.Tensor | None = None, **options) -> "QuipLinear":
        out_features, in_features = q.shape
        n_hi = 0 if q.hi is None else int(q.hi.sum())
        m = cls(in_features, out_features, q.bits, q.resid_scale, bias is not None, q.dtype, q.real_signs, n_hi,
                q.resid_scale_hi)
        m.codes.copy_(q.codes)
        if q.resid is not None:
            m.resid.copy_(q.resid)
        if n_hi:
            m.hi.copy_(pack_bits(q.hi.to(torch.uint8), 1))
            m.resid_hi.copy_(q.resid_hi)
        m._store_signs(q.su, q.sv)
        m.scale.copy_(q.scale)
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def _store_signs(self, su: torch.Tensor, sv: torch.Tensor) -> None:
        if self.real_signs:
            self.su.copy_(su.half())
            self.sv.copy_(sv.half())
        else:
            self.su.copy_(pack_bits((su < 0).to(torch.uint8), 1))
            self.sv.copy_(pack_bits((sv < 0).to(torch.uint8), 1))

    def signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(su [in], sv [out]) float32: ±1, or the tuned real values."""
        if self.real_signs:
            return self.su.float(), self.sv.float()
        return _signs(self.su, self.in_features), _signs(self.sv, self.out_features)

    def quantized(self) -> QuipWeight:
        """The QuipWeight this module holds."""
        resid = self.resid.clone() if self.bits > 2 else None
        su, sv = self.signs()
        finer = {} if not self.finer_blocks else {
            "hi": unpack_bits(self.hi, 1, self.in_features // DIM).bool(), "resid_hi": self.resid_hi.clone(),
            "resid_scale_hi": self.resid_scale_hi}
        return QuipWeight(self.codes.clone(), resid, su, sv, self.scale.clone(), self.resid_scale, self.compute_dtype,
                          real_signs=self.real_signs, **finer)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantized()
        tuned = getattr(self, "_tuned", None)
        if tuned is None:
            su, sv, w = q.su, q.sv, q.transformed()
        else:   # block fine-tuning: the float32 masters, differentiably
            su, sv, scale = tuned
            w = q.transformed() / q.scale * scale
        y = rht_inverse(F.linear(rht(x.float(), su), w), sv).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def tuning_start(self) -> list[torch.Tensor]:
        """Block fine-tuning (pipeline/tuning.py): float32 masters of the signs, as real numbers (QuIP#'s
        fine-tuning of SU / SV), and of the scale, trained until tuning_end; the codes stay fixed."""
        su, sv = self.signs()
        self._tuned = (su.requires_grad_(), sv.requires_grad_(), self.scale.clone().requires_grad_())
        return list(self._tuned)

    def tuning_end(self):
        """Store the tuned values (the signs as fp16 vectors from now on) and leave tuning; returns a
        function that puts back what was stored before."""
        su, sv, scale = (t.detach() for t in self._tuned)
        before = (self.real_signs, self.su, self.sv, self.scale.clone())
        self.real_signs = True
        self.su, self.sv = su.half(), sv.half()
        self.scale.copy_(scale)
        self._tuned = None

        def undo():
            self.real_signs, self.su, self.sv = before[:3]
            self.scale.copy_(before[3])
        return undo

    def layer_config(self) -> dict:
        d = {"module": "QuipLinear", "in_features": self.in_features, "out_features": self.out_features,
             "bits": self.bits, "resid_scale": self.resid_scale, "bias": self.bias is not None}
        if self.finer_blocks:
            d.update(finer_blocks=self.finer_blocks, resid_scale_hi=self.resid_scale_hi)
        return {**d, "real_signs": True} if self.real_signs else d

    @classmethod
    def from_layer_config(cls, d: dict) -> "QuipLinear":
        finer = d.get("finer_blocks", 0)
        if type(finer) is not int or not 0 <= finer <= d["in_features"] // DIM or (finer and d["bits"] not in (2, 3)):
            raise ValueError(f"finer_blocks {finer} does not fit {d['in_features']} inputs at {d['bits']} bits")
        return cls(d["in_features"], d["out_features"], d["bits"], d["resid_scale"], d["bias"],
                   real_signs=bool(d.get("real_signs", False)), finer_blocks=finer,
                   resid_scale_hi=float(d["resid_scale_hi"]) if finer else 1.0)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        blocks = self.in_features // DIM
        finer = f" ({self.finer_blocks} of {blocks} blocks at {self.bits + 1})" if self.finer_blocks else ""
        return f"in={self.in_features}, out={self.out_features}, QuIP# E8P {self.bits} bits/weight{finer}"
