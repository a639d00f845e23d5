"""Codebook weights: QuIP#'s lattice codes and AQLM's additive codes.

QuIP#'s weight (Tseng et al., 2024, "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and
Lattice Codebooks"): lattice codes of the weight in a randomly rotated basis, plus the rotation's signs.

    W = V^T Ŵr U        U = H_in D(su) / sqrt(in),  V = H_out D(sv) / sqrt(out)   (core/hadamard.py)
    Ŵr = scale * (E8P[codes] + R[resid] / resid_scale)       8 consecutive inputs per code
         (on the blocks `hi` marks: R'[resid_hi] / resid_scale_hi, the next finer residual codebook)

    codes   int16 [out, in / 8]: E8P codes (formats/e8.py), 2 bits per weight
    resid   None (2 bits), uint8 [out, in / 8] codes of the 256-entry E8 residual codebook (3 bits), or
            int16 [out, in / 8] E8P codes of the residual (4 bits): residual vector quantisation
    hi      None, or bool [in / 8]: the blocks rounded one bit finer (QuIP(plus=...)); their residual codes
            are then `resid_hi` [out, blocks marked] (uint8 at 3 bits, int16 at 4) with gain `resid_scale_hi`,
            and `resid` holds the other blocks' only [out, blocks unmarked] (None when they are 2-bit)
    su, sv  the random signs (±1) of the input and output transforms, stored one bit each; after block
            fine-tuning real numbers (`real_signs`), stored fp16, as QuIP#'s tuned SU / SV are
    scale   float32 []: the matrix's codebook scale; resid_scale: the residual stage's fixed gain

nn/quip.py runs it without forming W: y = (rht(x, su) Ŵr^T) V.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.core.hadamard import rht_both_inverse
from lowbit.core.quantize import StoredSize
from lowbit.errors import LowbitError
from lowbit.formats.e8 import DIM, e81b_table, e8p_decode

SCALE_BITS = 32
RESID_BITS = {2: 0, 3: 8, 4: 16}           # bits of the residual code per 8 weights


class VectorCoded(StoredSize):
    """A weight whose codes [out, in / 8, ...] each stand for 8 consecutive inputs of a row."""

    codes: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.codes.shape[0], self.codes.shape[1] * DIM])

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass
class QuipWeight(VectorCoded):
    codes: torch.Tensor
    resid: torch.Tensor | None
    su: torch.Tensor
    sv: torch.Tensor
    scale: torch.Tensor
    resid_scale: float = 1.0
    dtype: torch.dtype = torch.float32
    extras: dict = field(default_factory=dict)
    real_signs: bool = False
    hi: torch.Tensor | None = None
    resid_hi: torch.Tensor | None = None
    resid_scale_hi: float = 1.0

    def __post_init__(self):
        out, blocks = self.codes.shape
        if self.su.numel() != blocks * DIM or self.sv.numel() != out:
            raise LowbitError(f"QuIP# signs of {self.su.numel()} inputs and {self.sv.numel()} outputs do not fit "
                              f"codes {tuple(self.codes.shape)} of {DIM} inputs each")
        self._check_finer(out, blocks)
        n_hi = 0 if self.hi is None else int(self.hi.sum())
        if self.resid is not None and self.resid.shape != (out, blocks - n_hi):
            raise LowbitError(f"QuIP# residual codes {tuple(self.resid.shape)} differ from {(out, blocks - n_hi)}")

    def _check_finer(self, out: int, blocks: int) -> None:
        if self.hi is None:
            if self.resid_hi is not None:
                raise LowbitError("QuIP# residual codes for finer blocks, but no blocks marked finer")
            return
        ok = (self.hi.dtype == torch.bool and self.hi.shape == (blocks,) and bool(self.hi.any())
              and self.bits < 4 and self.resid_hi is not None
              and self.resid_hi.shape == (out, int(self.hi.sum()))
              and self.resid_hi.dtype == (torch.uint8 if self.bits == 2 else torch.int16))
        if not ok:
            codes = None if self.resid_hi is None else (tuple(self.resid_hi.shape), self.resid_hi.dtype)
            raise LowbitError(f"QuIP# finer blocks need a bool mark per block ({blocks}), at least one marked, "
                              f"coarser blocks of 2 or 3 bits and residual codes of the next codebook for each "
                              f"marked block; got marks {tuple(self.hi.shape)} {self.hi.dtype} with "
                              f"{int(self.hi.sum())} marked, {self.bits}-bit coarser blocks, residual codes {codes}")

    @property
    def bits(self) -> int:
        """The coarser blocks' bits per weight (all blocks' without `hi`)."""
        if self.resid is None:
            return 2
        return 4 if self.resid.dtype == torch.int16 else 3

    def transformed(self) -> torch.Tensor:
        """Ŵr, the weight in the rotated basis, float32 [out, in]."""
        w = e8p_decode(self.codes)
        lo = slice(None) if self.hi is None else ~self.hi
        if self.resid is not None:
            w[:, lo] += _residual(self.resid) / self.resid_scale
        if self.hi is not None:
            w[:, self.hi] += _residual(self.resid_hi) / self.resid_scale_hi
        return (w * self.scale.float()).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        return rht_both_inverse(self.transformed(), self.su.float(), self.sv.float()).to(self.dtype)

    @property
    def storage_bits(self) -> int:
        """Codes (16 bits per 8 weights, plus 8 or 16 for the residual), one bit per sign (16 once tuned to
        real values), the fp32 scale; with finer blocks, one bit per block marks them."""
        out, n_in = self.shape
        sign_bits = 16 if self.real_signs else 1
        codes = 16 * self.codes.numel() + (0 if self.resid is None else RESID_BITS[self.bits] * self.resid.numel())
        if self.hi is not None:
            codes += RESID_BITS[self.bits + 1] * self.resid_hi.numel() + self.hi.numel()
        return codes + sign_bits * (n_in + out) + SCALE_BITS


def _residual(codes: torch.Tensor) -> torch.Tensor:
    """Residual codewords [..., 8]: E8P for int16 codes, the 256-entry E8 codebook for uint8."""
    return e8p_decode(codes) if codes.dtype == torch.int16 else e81b_table()[codes.long()]


@dataclass
class AQLMWeight(VectorCoded):
    """AQLM's weight (Egiazarian et al., 2024, "Extreme Compression of Large Language Models via Additive
    Quantization"): each group of 8 consecutive inputs of a row is the sum of one codeword from each of M
    learned codebooks, times the row's scale.

        W[o, 8g:8g+8] = scales[o] * sum_m codebooks[m, codes[o, g, m]]

    codes      [out, in / 8, M]: uint8 (2^8-entry codebooks) or int16 bit patterns (2^16 entries)
    codebooks  fp16 [M, 2^code_bits, 8]     scales  fp16 [out]
    """

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype = torch.float32
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        out, _, m = self.codes.shape
        if self.codebooks.dim() != 3 or self.codebooks.shape[0] != m or self.codebooks.shape[2] != DIM:
            raise LowbitError(f"AQLM codebooks {tuple(self.codebooks.shape)} do not fit codes {tuple(self.codes.shape)}")
        if self.scales.shape != (out,):
            raise LowbitError(f"AQLM needs one scale per output row ({out}), got {tuple(self.scales.shape)}")

    @property
    def code_bits(self) -> int:
        return 8 if self.codes.dtype == torch.uint8 else 16

    def unscaled(self) -> torch.Tensor:
        """sum_m codebooks[m, codes[..., m]], float32 [out, in] (the weight before the row scales)."""
        idx = self.codes.long() & 0xFFFF
        books = self.codebooks.float()
        total = sum(books[m][idx[..., m]] for m in range(books.shape[0]))
        return total.reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        return (self.unscaled() * self.scales.float()[:, None]).to(self.dtype)

    @property
    def storage_bits(self) -> int:
        """Codes (code_bits each), the fp16 codebooks and the fp16 row scales."""
        return self.code_bits * self.codes.numel() + 16 * self.codebooks.numel() + 16 * self.scales.numel()
