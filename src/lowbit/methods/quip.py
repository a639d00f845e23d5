"""QuIP# (Tseng et al., 2024, "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice
Codebooks"; reference: Cornell-RelaxML/quip-sharp, lib/algo/quip.py), without its low-rank part:

1. incoherence: W <- V W U^T and H <- U H U^T with the randomised Hadamard transforms U (inputs) and V
   (outputs) of core/hadamard.py (random sign vectors from `seed`), which make the weights close to
   i.i.d. Gaussian and spread H's energy over its diagonal;
2. one scale per matrix: Wr / scale has the RMS the codebook is tuned for (`opt_scale`, the Gaussian
   optimum: 1.03 for E8P, QuIP#'s numbers for the residual codebooks; with finer blocks, the optimum of
   the codebook most blocks use);
3. BlockLDLQ (methods/ldlq.py) over 8-column blocks with the exact nearest E8P codeword (formats/e8.py);
   at 3 and 4 bits each block is rounded by residual vector quantisation: E8P, then the residual times
   `resid_scale` rounded by the 8-bit E8 codebook (3 bits) or by E8P again (4 bits); `tune` passes then
   round each block again given all the others, where that lowers the error; with `plus` (words
   `2.5bit`, `3.25bit` ...: bits and a fraction) that fraction of the 8-column blocks is rounded one bit
   finer, the blocks whose errors weigh most in the proxy loss, the largest tr(D_k) of the block LDL (the
   loss is sum_k tr(D_k) MSE_k): bits allocated inside the matrix, for fractional rates;
4. with `finetune` epochs (word `ftN`), fine-tuning within the block once it is quantised: the sign
   vectors as real numbers (the paper's SU / SV, then stored fp16), the scale and the block's float
   parameters trained towards the full-precision model's hidden states at the block's output, codes fixed
   (pipeline/tuning.py). The paper tunes after each Linear, the not yet quantised ones too; here the whole
   block is tuned once;
5. with `e2e` epochs (word `e2eN`), the paper's second stage: the same parts of every block tuned at once,
   end to end, towards the full-precision model's last hidden states (the paper uses the logits' KL).

The result is a QuipWeight (weights/codebook.py) of codes, signs and the scale; nn/quip.py applies the
transforms to activations at inference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.core.hadamard import hadamard_factor, random_signs, rht_both
from lowbit.errors import LowbitError
from lowbit.formats.e8 import DIM, e81b_nearest, e8p_nearest
from lowbit.methods.base import E2E_LR, BlockTuned, MethodConfig, register_method
from lowbit.methods.gptq import _check_hessian, _check_weight
from lowbit.methods.ldlq import block_ldl, block_ldlq, block_refine
from lowbit.weights.codebook import QuipWeight
from lowbit.weights.placeholders import free

# bits -> (RMS of Wr / scale, gain of the residual before its codebook): 2 bits measured here on a Gaussian
# source (tests/methods/test_quip.py), 3 and 4 bits QuIP#'s E8P12RVQ3B / E8P12RVQ4B values
OPT_SCALE = {2: 1.03, 3: 0.98, 4: 1.03}
RESID_SCALE = {2: 1.0, 3: 2.04, 4: 3.45}
RESID_DTYPE = {2: None, 3: torch.uint8, 4: torch.int16}   # residual codes: none, E8 (256 entries), E8P
PLUS = (0.25, 0.5, 0.75)                                   # the fractions with a word: 2.25bit ... 3.75bit
# as AQLM's (methods/aqlm.py); quip-tune1 on all-MiniLM-L6-v2: 0.8871 -> 0.8952 at 8 epochs (measured when the
# target was the full-precision block on the quantised inputs)
FINETUNE_LR = 1e-3


@register_method
@dataclass(frozen=True)
class QuIP(BlockTuned, MethodConfig):
    """QuIP#: bits 2 (E8P), 3 (E8P + E8 residual) or 4 (E8P + E8P residual) per weight, plus a bit per input and output
    for the signs. plus: the fraction of 8-column blocks rounded at bits + 1 (0, 0.25, 0.5 or 0.75; bits + 1 <= 4),
    those that weigh most in the proxy loss, for bits + plus per weight. damp: fraction of H's mean diagonal added
    to it. seed: the random signs. opt_scale: RMS of the rotated weight in codebook units (None: OPT_SCALE). tune:
    refinement passes after BlockLDLQ (methods/ldlq.py block_refine; the reference's quip_tune_iters). finetune:
    epochs of block fine-tuning of the signs, the scale and the block's float parameters once the block is quantised
    (pipeline/tuning.py; 0: none), at finetune_lr. e2e: epochs of end-to-end tuning of the same parts in every block
    at once, after the last block (the paper's second fine-tuning stage), at e2e_lr."""

    name = "quip"
    required_stats = ("hessian",)
    sequential = True
    alone = True
    words = {**{f"{b}bit": {"bits": b, "plus": 0.0} for b in (2, 3, 4)},
             **{f"{b + f:g}bit": {"bits": b, "plus": f} for b in (2, 3) for f in PLUS},
             "damp": "damp", "seed": "seed", "scale": "opt_scale", "tune": "tune", "ft": "finetune",
             "ftlr": "finetune_lr", "e2e": "e2e", "e2elr": "e2e_lr"}
    # what `--method quip --budget` mixes: 2 to 4 bits, in quarter steps from 3
    budget_candidates = ("quip", "quip-2.5bit", "quip-3bit", "quip-3.25bit", "quip-3.5bit", "quip-3.75bit",
                         "quip-4bit")
    bits: int = 2
    plus: float = 0.0
    damp: float = 0.01
    seed: int = 0
    opt_scale: float | None = None
    tune: int = 0
    finetune: int = 0
    finetune_lr: float = FINETUNE_LR
    e2e: int = 0
    e2e_lr: float = E2E_LR

    def __post_init__(self):
        if self.bits not in OPT_SCALE:
            raise LowbitError(f"quip quantises to 2, 3 or 4 bits per weight, not {self.bits!r}")
        if not (0 <= self.damp < math.inf):
            raise LowbitError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if self.plus not in (0, *PLUS) or (self.plus and self.bits + 1 not in OPT_SCALE):
            raise LowbitError(f"quip rounds a fraction plus of {', '.join(map(str, PLUS))} of its blocks one bit "
                              f"finer, up to 4 bits; got {self.bits} bits plus {self.plus!r}")
        if not (isinstance(self.tune, int) and 0 <= self.tune):
            raise LowbitError(f"quip's tune passes must be an integer >= 0, got {self.tune!r}")
        if self.opt_scale is not None and not (0 < self.opt_scale < math.inf):
            raise LowbitError(f"quip's opt_scale must be a positive number, got {self.opt_scale!r}")
        self.check_finetune()

    def scale_target(self, finer: int = 0, blocks: int = 1) -> float:
        """The RMS of Wr / scale: opt_scale, else the optimum of the codebook at least half the blocks use
        (`finer` of `blocks` rounded at bits + 1)."""
        if self.opt_scale is not None:
            return self.opt_scale
        return OPT_SCALE[self.bits + (finer > 0 and 2 * finer >= blocks)]

    def quantize_weight(self, weight, stats=None) -> QuipWeight:
        if stats is None or stats.n_tokens == 0:
            raise LowbitError("quip needs a Hessian from calibration data, and no calibration tokens reached "
                              "this layer")
        return quip_quantize(weight, stats.hessian(), self)

    def planned_weight(self, shape, layer) -> QuipWeight:
        """Placeholders that allocate nothing; a shape the Hadamard transform cannot take is refused here."""
        out, n_in = shape
        hadamard_factor(n_in), hadamard_factor(out)
        blocks = n_in // DIM
        n_hi = finer_blocks(self.plus, blocks)
        codes = free((out, blocks), torch.int16)
        resid = RESID_DTYPE[self.bits] and free((out, blocks - n_hi), RESID_DTYPE[self.bits])
        hi = {} if not n_hi else {"hi": torch.arange(blocks) < n_hi,
                                  "resid_hi": free((out, n_hi), RESID_DTYPE[self.bits + 1]),
                                  "resid_scale_hi": RESID_SCALE[self.bits + 1]}
        return QuipWeight(codes, resid, free((n_in,), torch.float32, 1), free((out,), torch.float32, 1),
                          torch.ones(()), RESID_SCALE[self.bits], **hi)


def finer_blocks(plus: float, blocks: int) -> int:
    """How many of `blocks` 8-column blocks a fraction `plus` rounds one bit finer (halves rounded up)."""
    return math.floor(plus * blocks + 0.5)


def codebook_rounding(bits: int):
    """The vector quantiser for BlockLDLQ: x [rows, 8] -> (values [rows, 8], (codes, [residual codes])); the
    block index k is not used."""
    gain = RESID_SCALE[bits]

    def rounding(x: torch.Tensor, k: int | None = None):
        codes, values = e8p_nearest(x)
        if bits == 2:
            return values.to(x.dtype), (codes,)
        resid = (x - values) * gain
        rcodes, rvalues = e8p_nearest(resid) if bits == 4 else e81b_nearest(resid)
        return (values + rvalues / gain).to(x.dtype), (codes, rcodes)
    return rounding


def check_dims(n_out: int, n_in: int) -> None:
    if n_in % DIM:
        raise LowbitError(f"quip codes {DIM} inputs at a time; the weight has {n_in} input columns")
    hadamard_factor(n_in)
    hadamard_factor(n_out)


def quip_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: QuIP,
                  finer: torch.Tensor | None = None) -> QuipWeight:
    """QuIP#-quantise weight [out, in] given H [in, in] (2/n X^T X). Transforms and the LDL in float64, the
    codebook search in float32. finer: bool [in / 8], the blocks to round at bits + 1 instead of the top
    `plus` by error_weights (a study of the choice, benchmarks/mix_headroom.py)."""
    _check_weight(weight)
    n_out, n_in = weight.shape
    _check_hessian(hessian, n_in)
    check_dims(n_out, n_in)
    gen = torch.Generator().manual_seed(config.seed)
    su, sv = random_signs(n_in, gen), random_signs(n_out, gen)
    wr = rht_both(weight.detach().double(), su.double(), sv.double())
    hr = rht_both(hessian.double(), su.double(), su.double())
    warnings: list[str] = []
    lower, d = block_ldl(hr, DIM, config.damp, warnings)
    hi = finer_mask(d, config.plus) if finer is None else (finer.bool() if bool(finer.any()) else None)
    target = config.scale_target(0 if hi is None else int(hi.sum()), d.shape[0])
    rms = float(wr.square().mean().sqrt())
    scale = torch.tensor(rms / target if rms > 0 else 1.0, dtype=torch.float32)
    rounding = mixed_rounding(config.bits, hi) if hi is not None else codebook_rounding(config.bits)
    what, streams = block_ldlq(wr / scale.double(), lower, DIM, rounding)
    if config.tune:
        damped = hr + config.damp * float(hr.diagonal().mean()) * torch.eye(n_in, dtype=hr.dtype)
        block_refine(wr / scale.double(), what, damped, DIM, rounding, streams, config.tune)
    q = QuipWeight(streams[0].to(torch.int16), su=su, sv=sv, scale=scale, resid_scale=RESID_SCALE[config.bits],
                   dtype=weight.dtype, **residuals(streams, config.bits, hi))
    if warnings:
        q.extras["warnings"] = warnings
    return q


def finer_mask(d: torch.Tensor, plus: float) -> torch.Tensor | None:
    """The blocks rounded one bit finer, bool [in / 8]: the top `plus` of them by tr(D_k) (d [in / 8, 8, 8]
    from block_ldl), the weight of block k's error in the proxy loss; None when plus is 0."""
    n_hi = finer_blocks(plus, d.shape[0])
    if not n_hi:
        return None
    hi = torch.zeros(d.shape[0], dtype=torch.bool)
    hi[torch.argsort(block_traces(d), descending=True, stable=True)[:n_hi]] = True
    return hi


def block_traces(d: torch.Tensor) -> torch.Tensor:
    """tr(D_k) of block_ldl's D [in / 8, 8, 8]: the weight of block k's rounding error in BlockLDLQ's proxy
    loss, sum_k tr(D_k) MSE_k."""
    return d.diagonal(dim1=1, dim2=2).sum(1)


def error_weights(hessian: torch.Tensor, config: QuIP) -> torch.Tensor:
    """block_traces of the rotated, damped H [in, in] as quip_quantize rotates it (config's seed and damp):
    what `plus` ranks the blocks by, float64 [in / 8]."""
    su = random_signs(hessian.shape[0], torch.Generator().manual_seed(config.seed)).double()
    return block_traces(block_ldl(rht_both(hessian.double(), su, su), DIM, config.damp, [])[1])


def mixed_rounding(bits: int, hi: torch.Tensor):
    """codebook_rounding at bits + 1 for the blocks `hi` marks and at bits elsewhere, with two code streams
    for every block (E8P codes; residual codes as int16, zero where a 2-bit block has none)."""
    rounders = (codebook_rounding(bits), codebook_rounding(bits + 1))

    def rounding(x: torch.Tensor, k: int):
        values, codes = rounders[int(hi[k])](x)
        resid = codes[1].to(torch.int16) if len(codes) > 1 else torch.zeros_like(codes[0], dtype=torch.int16)
        return values, (codes[0], resid)
    return rounding


def residuals(streams: list[torch.Tensor], bits: int, hi: torch.Tensor | None) -> dict:
    """QuipWeight's residual fields from the code streams: `resid` alone, or split between the coarser
    blocks (`resid`) and the finer ones (`resid_hi`, `hi`, `resid_scale_hi`)."""
    if hi is None:
        return {"resid": None if bits == 2 else streams[1].to(RESID_DTYPE[bits])}
    lo = None if bits == 2 else streams[1][:, ~hi].to(RESID_DTYPE[bits])
    return {"resid": lo, "hi": hi, "resid_hi": streams[1][:, hi].to(RESID_DTYPE[bits + 1]),
            "resid_scale_hi": RESID_SCALE[bits + 1]}
