"""AQLM (Egiazarian et al., 2024, "Extreme Compression of Large Language Models via Additive Quantization"):
every group of 8 consecutive inputs of a row is the sum of one codeword
from each of M learned codebooks of 2^B entries, times the row's scale (weights/codebook.py AQLMWeight),
chosen to minimise the layer's output error

    f = tr((W - Ŵ) H (W - Ŵ)^T)                    H = 2/n X^T X (+ damp), the calibration Hessian

1. scales: each row's RMS (fp16); codebooks and codes: residual k-means (k-means++ seeds, 15 Lloyd steps)
   on the scaled rows' 8-vectors (codebook m clusters what codebooks < m left);
2. `rounds` times: (a) codes by exact coordinate descent on f: for each group and codebook in turn, every
   row takes the codeword with the least f given all its other codes (the change of f has a closed
   form through H's 8 x 8 diagonal block and the row's residual times H) — beam search of width 1;
   (b) codebooks by `adam_steps` Adam steps on f (the paper's update), kept only when f falls once they
   are rounded to fp16; (c) scales by least squares per row (w H v / v H v), kept where f falls.
Each step can only lower f, so the objective never increases (extras["objective"] lists it per round).
3. with `finetune` epochs (word `ftN`), the paper's block-level fine-tuning once the whole block is
   quantised: codebooks, scales and the block's float parameters trained towards the full-precision
   model's hidden states at the block's output, codes fixed (pipeline/tuning.py); with `e2e` epochs (word
   `e2eN`), the same parts of every block at once, end to end, after the last block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.formats.e8 import DIM
from lowbit.methods.base import E2E_LR, BlockTuned, MethodConfig, register_method
from lowbit.methods.gptq import _check_hessian, _check_weight
from lowbit.weights.codebook import AQLMWeight
from lowbit.weights.placeholders import free

KMEANS_ITERS = 15
# Block fine-tuning's Adam step: on all-MiniLM-L6-v2 at 2x8 (256 calibration sentences, 8 epochs) 1e-3 gave
# mean cosine 0.8748, 1e-4 (4 epochs) 0.8715, 3e-3 0.8683; untuned 0.8633 (measured when the target was the
# full-precision block on the quantised inputs)
FINETUNE_LR = 1e-3
KMEANS_PP_MAX = 4096


@register_method
@dataclass(frozen=True)
class AQLM(BlockTuned, MethodConfig):
    """codebooks x code_bits: 2x8 (default; 2 bits per weight plus codebooks and scales) or 1x16. rounds:
    code / codebook / scale rounds after the k-means start. adam_steps, lr: the codebook update. damp: as
    GPTQ. seed: the k-means start. finetune: epochs of block fine-tuning of the codebooks, scales and the
    block's float parameters once the block is quantised (pipeline/tuning.py; 0: none), at finetune_lr.
    e2e: epochs of end-to-end tuning of the same parts in every block at once, after the last block, at
    e2e_lr."""

    name = "aqlm"
    required_stats = ("hessian",)
    sequential = True
    alone = True
    words = {"2x8": {"codebooks": 2, "code_bits": 8}, "1x16": {"codebooks": 1, "code_bits": 16},
             "1x8": {"codebooks": 1, "code_bits": 8}, "r": "rounds", "steps": "adam_steps", "seed": "seed",
             "ft": "finetune", "ftlr": "finetune_lr", "e2e": "e2e",
             "e2elr": "e2e_lr"}
    codebooks: int = 2
    code_bits: int = 8
    rounds: int = 4
    adam_steps: int = 40
    lr: float = 3e-3
    damp: float = 0.01
    seed: int = 0
    finetune: int = 0
    finetune_lr: float = FINETUNE_LR
    e2e: int = 0
    e2e_lr: float = E2E_LR

    def __post_init__(self):
        if not (isinstance(self.codebooks, int) and 1 <= self.codebooks <= 8):
            raise LowbitError(f"aqlm takes 1..8 codebooks, not {self.codebooks!r}")
        if self.code_bits not in (8, 16):
            raise LowbitError(f"aqlm's codebooks have 2^8 or 2^16 entries, not 2^{self.code_bits}")
        if not (isinstance(self.rounds, int) and self.rounds >= 0 and self.adam_steps >= 0):
            raise LowbitError("aqlm's rounds and adam_steps must be integers >= 0")
        if not (0 <= self.damp < math.inf and 0 < self.lr < math.inf):
            raise LowbitError(f"aqlm: damp must be >= 0 and lr > 0, got {self.damp!r}, {self.lr!r}")
        self.check_finetune()

    def quantize_weight(self, weight, stats=None) -> AQLMWeight:
        if stats is None or stats.n_tokens == 0:
            raise LowbitError("aqlm needs a Hessian from calibration data, and no calibration tokens reached "
                              "this layer")
        return aqlm_quantize(weight, stats.hessian(), self)

    def planned_weight(self, shape, layer) -> AQLMWeight:
        out, n_in = shape
        dtype = torch.uint8 if self.code_bits == 8 else torch.int16
        return AQLMWeight(free((out, n_in // DIM, self.codebooks), dtype),
                          free((self.codebooks, 1 << self.code_bits, DIM), torch.float16),
                          free((out,), torch.float16, 1))


# ---------------------------------------------------------------------------------------------------
# Start: residual k-means

def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid [k, d] to each row of x [n, d] (int64 [n])."""
    return (2 * x @ centroids.T - centroids.square().sum(-1)).argmax(-1)


def seeds(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii, 2007): each next seed drawn with probability proportional to its
    squared distance from the seeds so far; plain seeded draws above KMEANS_PP_MAX seeds (1x16)."""
    n = x.shape[0]
    if k > KMEANS_PP_MAX:
        return x[torch.randint(0, n, (k,), generator=gen)].clone()
    chosen = [int(torch.randint(0, n, (1,), generator=gen))]
    d2 = (x - x[chosen[0]]).square().sum(-1)
    for _ in range(1, k):
        total = float(d2.sum())
        i = int(torch.multinomial(d2 / total, 1, generator=gen)) if total > 0 else int(torch.randint(0, n, (1,), generator=gen))
        chosen.append(i)
        d2 = torch.minimum(d2, (x - x[i]).square().sum(-1))
    return x[chosen].clone()


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = KMEANS_ITERS):
    """Lloyd's k-means of x [n, d] from k-means++ seeds: (centroids [k, d], assignment [n])."""
    centroids = seeds(x, k, gen)
    for _ in range(iters):
        a = nearest(x, centroids)
        counts = torch.bincount(a, minlength=k).to(x.dtype)[:, None]
        sums = torch.zeros_like(centroids).index_add_(0, a, x)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)   # an empty one stays
    return centroids, nearest(x, centroids)


def residual_kmeans(v: torch.Tensor, m: int, k: int, gen: torch.Generator):
    """Codebooks [m, k, 8] and codes [n, m] of the 8-vectors v [n, 8], each codebook fitted to the residual
    the previous ones leave."""
    residual, books, codes = v.clone(), [], []
    for _ in range(m):
        c, a = kmeans(residual, k, gen)
        residual -= c[a]
        books.append(c)
        codes.append(a)
    return torch.stack(books), torch.stack(codes, 1)


# ---------------------------------------------------------------------------------------------------
# The objective and the three updates

def decode(codes: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """sum_m books[m, codes[..., m]]: [out, groups, 8] from codes [out, groups, M] (int64)."""
    return sum(books[m][codes[..., m]] for m in range(books.shape[0]))


def objective(w, h, scales, codes, books) -> float:
    d = w - scales[:, None] * decode(codes, books).reshape(w.shape)
    return float(((d @ h) * d).sum())


def update_codes(w, h, scales, codes, books) -> torch.Tensor:
    """One sweep of exact coordinate descent over every (group, codebook), all rows at once. codes is
    updated in place and returned."""
    out, n_in = w.shape
    s = scales[:, None]
    r = (w - s * decode(codes, books).reshape(out, n_in)) @ h            # (W - Ŵ) H, kept up to date
    for g in range(n_in // DIM):
        cols = slice(g * DIM, (g + 1) * DIM)
        hg = h[cols, cols]
        for m in range(books.shape[0]):
            book = books[m]
            cur = book[codes[:, g, m]]                                    # [out, 8]
            bh = book @ hg                                                # [K, 8]
            quad = (bh * book).sum(-1)[None] - 2 * cur @ bh.T + ((cur @ hg) * cur).sum(-1, keepdim=True)
            lin = r[:, cols] @ book.T - (r[:, cols] * cur).sum(-1, keepdim=True)
            k = (s.square() * quad - 2 * s * lin).argmin(1)               # f(new) - f(old) per row
            change = s * (book[k] - cur)
            codes[:, g, m] = k
            r -= change @ h[cols]
    return codes


def codebook_gradient(w, h, scales, codes, books) -> torch.Tensor:
    """df/dbooks [M, K, 8]: df/dŴ = -2 (W - Ŵ) H, through Ŵ = scales ⊙ decode, summed over each codeword's
    uses."""
    d = w - scales[:, None] * decode(codes, books).reshape(w.shape)
    g = (-2 * scales[:, None] * (d @ h)).reshape(-1, DIM)
    flat = codes.reshape(-1, codes.shape[-1])
    return torch.stack([torch.zeros_like(books[m]).index_add_(0, flat[:, m], g) for m in range(books.shape[0])])


def update_codebooks(w, h, scales, codes, books, config: AQLM, betas=(0.9, 0.999), eps=1e-8) -> torch.Tensor:
    """Adam (Kingma & Ba, 2015) on f over the codebooks; the fp16-rounded result if it lowers f, else the old
    codebooks."""
    before = objective(w, h, scales, codes, books)
    param, m1, m2 = books.clone(), torch.zeros_like(books), torch.zeros_like(books)
    for t in range(1, config.adam_steps + 1):
        g = codebook_gradient(w, h, scales, codes, param)
        m1.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        m2.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        step = (m1 / (1 - betas[0] ** t)) / ((m2 / (1 - betas[1] ** t)).sqrt() + eps)
        param -= config.lr * step
    new = param.half().float()
    return new if objective(w, h, scales, codes, new) < before else books


def update_scales(w, h, scales, codes, books) -> torch.Tensor:
    """Per row the least-squares scale w H v / v H v (v the row's unscaled decoding), fp16, where it lowers
    the row's error."""
    v = decode(codes, books).reshape(w.shape)
    vh = v @ h
    whv, vhv, whw = (w * vh).sum(1), (v * vh).sum(1), ((w @ h) * w).sum(1)
    best = (whv / vhv.clamp_min(1e-30)).half().float()

    def err(s):
        return whw - 2 * s * whv + s.square() * vhv
    return torch.where(err(best) < err(scales), best, scales)


# ---------------------------------------------------------------------------------------------------
# The whole layer

def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.float().clone()
    diag = h.diagonal()
    live = diag > 0
    mean = float(diag[live].mean()) if live.any() else 1.0
    diag[~live] = mean
    diag += damp * mean
    return h


def aqlm_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: AQLM) -> AQLMWeight:
    """AQLM-quantise weight [out, in] given H [in, in]; float32 throughout."""
    _check_weight(weight)
    n_out, n_in = weight.shape
    _check_hessian(hessian, n_in)
    if n_in % DIM:
        raise LowbitError(f"aqlm codes {DIM} inputs at a time; the weight has {n_in} input columns")
    w, h = weight.detach().float(), damped(hessian, config.damp)
    scales = w.square().mean(1).sqrt().half().float()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    gen = torch.Generator().manual_seed(config.seed)
    books, codes = residual_kmeans((w / scales[:, None]).reshape(-1, DIM), config.codebooks, 1 << config.code_bits, gen)
    books = books.half().float()
    codes = codes.reshape(n_out, n_in // DIM, config.codebooks)
    history = [objective(w, h, scales, codes, books)]
    for _ in range(config.rounds):
        codes = update_codes(w, h, scales, codes, books)
        books = update_codebooks(w, h, scales, codes, books, config)
        scales = update_scales(w, h, scales, codes, books)
        history.append(objective(w, h, scales, codes, books))
    stored = codes.to(torch.uint8) if config.code_bits == 8 else torch.where(codes >= 1 << 15, codes - (1 << 16),
                                                                              codes).to(torch.int16)
    q = AQLMWeight(stored, books.half(), scales.half(), weight.dtype)
    q.extras["objective"] = history
    return q
