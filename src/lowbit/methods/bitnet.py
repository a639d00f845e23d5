"""BitNet b1.58's weight quantiser: ternary codes with the absmean scale, one scale per tensor.

Source: Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", eq. 1-3:

    gamma = mean |W|,   W~ = RoundClip(W / (gamma + eps), -1, 1),   W ~ gamma * W~

Here gamma is clamped below by eps instead of having eps added (as the authors' released code does), and
rounded to float16 before the codes are computed, so the stored scale (weights/ternary.py, one float16, which
is also what a TQ1_0/TQ2_0 block holds) is the one the codes were chosen for. Post-training, on a model
trained in float, it costs a lot (the bundled model: held-out perplexity 53.4 -> 142.2; b1.58 is meant to be
trained with it, train/bitnet.py, and 200 steps bring it back to 57.6); `lowbit quantize --method bitnet` is
the same function the trainer ends with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.methods.base import MethodConfig, register_method
from lowbit.weights import placeholders
from lowbit.weights.ternary import TernaryWeight, check_packing, packed_size

EPS = 1e-5


def absmean_scale(w: torch.Tensor) -> torch.Tensor:
    """gamma = max(mean |w|, eps) rounded to float16, as a float32 scalar (no gradient)."""
    return w.detach().float().abs().mean().clamp(min=EPS).to(torch.float16).float()


def ternary_codes(w: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """RoundClip(w / gamma, -1, 1): int8 codes in {-1, 0, +1} (round half to even)."""
    return torch.clamp(torch.round(w.detach().float() / gamma), -1, 1).to(torch.int8)


def absmean_ternary(w: torch.Tensor, packing: str = "trit5") -> TernaryWeight:
    """w [out, in] -> TernaryWeight with gamma = absmean_scale(w) and codes = ternary_codes(w, gamma)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise LowbitError(f"bitnet quantises 2-D weights [out, in], got {getattr(w, 'shape', type(w).__name__)}")
    if not torch.isfinite(w).all():
        raise LowbitError("weight contains NaN or infinite values")
    gamma = absmean_scale(w)
    return TernaryWeight.from_codes(ternary_codes(w, gamma), gamma, packing, w.dtype)


@register_method
@dataclass(frozen=True)
class BitNet(MethodConfig):
    """Ternary weights {-1, 0, +1} with one absmean scale per tensor ('bitnet', 'bitnet-2bit').

    packing: "trit5" (5 codes per byte, 1.6 bits per weight, written to GGUF as TQ1_0) or "2bit"
    (2 bits per weight, GGUF TQ2_0). Activations are quantised to int8 per token when the layer runs."""

    name = "bitnet"
    words = {"2bit": {"packing": "2bit"}}
    packing: str = "trit5"

    def __post_init__(self):
        check_packing(self.packing)

    def quantize_weight(self, weight, stats=None) -> TernaryWeight:
        return absmean_ternary(weight, self.packing)

    def planned_weight(self, shape, layer) -> TernaryWeight:
        n = torch.Size(shape).numel()
        return TernaryWeight(placeholders.free((packed_size(n, self.packing),), torch.uint8), torch.ones(()),
                             torch.Size(shape), self.packing)
