"""llama.cpp's quantisers as a method: one ggml block type for every weight ("ggml-q4_k").

The block types, their byte layouts and llama.cpp's scale searches live with the weight type
(lowbit.weights.ggml); this config chooses the type, the importance weighting and the search mode.
The file types ("q4_k_m": a type per tensor role) are methods/ggml_mix.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.methods import names
from lowbit.methods.base import MethodConfig, register_method
from lowbit.weights import placeholders
from lowbit.weights.ggml import GGMLTensor, canonical_type, fit_type, quantize_to_tensor


def importance_from_stats(stats) -> torch.Tensor:
    """llama.cpp's imatrix entry of a Linear: the mean squared input activation of each column, which
    is the diagonal of the input Gram matrix the pipeline gathers, divided by the token count."""
    if stats is None or getattr(stats, "xtx", None) is None or not stats.n_tokens:
        raise LowbitError("an importance matrix (imatrix) needs calibration statistics; none were gathered")
    return torch.diagonal(stats.xtx).float() / stats.n_tokens


GGML_WORDS = {"imatrix": {"imatrix": True}, "ref": {"search": False}}


class GGMLConfigMixin:
    """Shared by the per-type and the mix configs: the imatrix and search switches."""

    imatrix: bool
    search: bool

    @property
    def required_stats(self) -> tuple[str, ...]:
        return ("hessian",) if self.imatrix else ()


@register_method
@dataclass(frozen=True)
class GGMLQuant(GGMLConfigMixin, MethodConfig):
    """One ggml block type for every weight it is given ('ggml-q4_k', 'ggml-q6_k-imatrix', 'ggml-q4_0-ref').

    imatrix: weight the fit by the mean squared input activation of each column (needs calibration).
    search:  False = llama-quantize's own algorithm; True = its candidates and more, best per block.
    Rows that do not divide the block size fall back as llama.cpp does (Q4_K -> Q5_0, ..., F16).
    """

    name = "ggml"
    words = GGML_WORDS
    type: str = "Q4_K"
    imatrix: bool = False
    search: bool = True

    def __post_init__(self):
        object.__setattr__(self, "type", canonical_type(self.type))

    def quantize_weight(self, weight, stats=None) -> GGMLTensor:
        imatrix = importance_from_stats(stats) if self.imatrix else None
        from lowbit.kernels.ggml_search import searches   # here: importing lowbit loads no kernels

        with searches():   # the compiled scale searches when the kernels load (the same fits, faster)
            return quantize_to_tensor(weight, fit_type(self.type, weight.shape[-1]), imatrix, self.search)

    def planned_weight(self, shape, layer) -> GGMLTensor:
        return placeholders.ggml(shape, fit_type(self.type, shape[-1]))

    def short_name(self) -> str:
        return "-".join([self.name, self.type.lower(), *names.method_words(self)])

    @classmethod
    def from_short_name(cls, rest):
        if not rest:
            raise LowbitError("ggml needs a block type, e.g. ggml-q4_k")
        return cls(type=rest[0], **names.parse_words(cls, rest[1:], "-".join([cls.name, *rest])))
