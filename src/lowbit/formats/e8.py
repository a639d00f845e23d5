"""The E8 lattice and QuIP#'s E8P codebook (Tseng et al., 2024, "QuIP#: Even Better LLM Quantization with
Hadamard Incoherence and Lattice Codebooks", section 4 and appendix C; the construction and the 29 norm-12
patterns as in the authors' quip-sharp, lib/codebook/latticee8_padded12_rvq4bit.py).

    E8  = D8 ∪ (D8 + 1/2),   D8 = {x in Z^8 : sum x even}
    D8^ = D8 + 1/2 = {x in (Z + 1/2)^8 : sum x even}

E8P codes 8 weights in 16 bits (2 bits per weight): the 227 distinct absolute patterns |x| of the points
x of D8^ with ||x||^2 <= 10, plus 29 patterns of ||x||^2 = 12 (five 3/2 and three 1/2), make 256 absolute
patterns a; a codeword is s ⊙ a + t with signs s such that s ⊙ a lies in D8^ (the number of negative
coordinates has the parity of sum(a): 128 of the 256 sign vectors) and a shift t = ±1/4. Every codeword
is therefore a point of E8 ± 1/4, and there are 256 x 128 x 2 = 65,536 of them.

Code layout (16 bits, stored as int16): bits 15..8 the absolute pattern's index, bits 7..1 the signs of
coordinates 0..6 (1: negative), bit 0 the shift (1: +1/4, 0: -1/4); the sign of coordinate 7 is implied
by the parity. Decoding is one table lookup (`e8p_table()`, float32 [65536, 8]).

`e8p_nearest` is exact: for each shift and each absolute pattern the best signs are those of the input,
with the least costly coordinate flipped when their parity is wrong; see its docstring.

`e81b_table()`: QuIP#'s 8-bit residual codebook for 3 bits per weight (1 bit per weight): the 241 points
of E8 with ||x||^2 <= 2 (0 and the 240 roots) and 15 of the 16 points ±2 e_i (not -2 e_7), 256 in all.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch

from lowbit.errors import LowbitError

DIM = 8
CODES = 1 << 16
# QuIP#'s 29 absolute patterns of squared norm 12, in units of 1/2 (rvq4bit.py's list: distinct, unlike
# padded12.py's, which repeats one)
NORM12 = ((3, 1, 1, 1, 3, 3, 3, 3), (1, 3, 1, 1, 3, 3, 3, 3), (1, 1, 3, 1, 3, 3, 3, 3), (1, 1, 1, 3, 3, 3, 3, 3),
          (3, 3, 3, 1, 3, 3, 1, 1), (3, 3, 3, 1, 3, 1, 3, 1), (3, 3, 3, 1, 1, 3, 3, 1), (3, 3, 3, 1, 3, 1, 1, 3),
          (3, 3, 3, 1, 1, 3, 1, 3), (3, 3, 3, 1, 1, 1, 3, 3), (3, 3, 1, 3, 3, 3, 1, 1), (3, 3, 1, 3, 3, 1, 3, 1),
          (3, 3, 1, 3, 1, 3, 3, 1), (3, 3, 1, 3, 3, 1, 1, 3), (3, 3, 1, 3, 1, 3, 1, 3), (3, 3, 1, 3, 1, 1, 3, 3),
          (3, 1, 3, 3, 3, 3, 1, 1), (3, 1, 3, 3, 3, 1, 3, 1), (3, 1, 3, 3, 1, 3, 3, 1), (3, 1, 3, 3, 3, 1, 1, 3),
          (3, 1, 3, 3, 1, 3, 1, 3), (1, 3, 3, 3, 1, 1, 3, 3), (1, 3, 3, 3, 3, 3, 1, 1), (1, 3, 3, 3, 3, 1, 3, 1),
          (1, 3, 3, 3, 1, 3, 3, 1), (1, 3, 3, 3, 3, 1, 1, 3), (1, 3, 3, 3, 1, 3, 1, 3), (1, 1, 3, 3, 1, 3, 3, 3),
          (3, 3, 1, 1, 3, 3, 3, 1))
_CHUNK = 4096            # vectors per step of the nearest-codeword search (bounds its [chunk, 256, 8] scratch)


def in_e8(x: torch.Tensor) -> torch.Tensor:
    """Whether each row of x [..., 8] is a point of E8 (all integers or all half-integers, even sum). [...]"""
    t = (2 * x).round()
    on_half_grid = (2 * x == t).all(-1)
    t = t.long()
    one_coset = (t % 2 == 0).all(-1) | (t % 2 == 1).all(-1)
    return on_half_grid & one_coset & (t.sum(-1) % 4 == 0)          # sum x = sum t / 2 is even


@lru_cache(maxsize=1)
def e8p_abs_grid() -> torch.Tensor:
    """The 256 absolute patterns, float32 [256, 8]: the 227 of D8^ within ||x||^2 <= 10 (sorted), then the 29
    of squared norm 12."""
    half = torch.tensor([0.5, 1.5, 2.5])               # |x_i| <= sqrt(10) - 7/4 leaves 1/2, 3/2, 5/2
    pats = torch.cartesian_prod(*[half] * DIM)
    pats = pats[pats.square().sum(-1) <= 10]
    # an absolute pattern belongs to D8^ when some sign vector gives an even sum: always (flip one sign to
    # change the sum's parity), so every pattern within the ball counts
    grid = torch.cat([torch.unique(pats, dim=0), torch.tensor(NORM12, dtype=torch.float32) / 2])
    if grid.shape[0] != 256:
        raise LowbitError(f"E8P: {grid.shape[0]} absolute patterns, expected 256")
    return grid


def _odd_sum(grid: torch.Tensor) -> torch.Tensor:
    """Whether sum(a) is odd for each absolute pattern (then an odd number of signs is negative). [256]"""
    return grid.sum(-1).round().long() % 2 == 1


@lru_cache(maxsize=1)
def e8p_table() -> torch.Tensor:
    """The codeword of every 16-bit code, float32 [65536, 8] (row c: code c read as an unsigned integer)."""
    grid = e8p_abs_grid()
    c = torch.arange(CODES)
    a = grid[c >> 8]
    neg = ((c[:, None] >> (torch.arange(DIM - 1) + 1)) & 1).bool()
    last = (neg.sum(-1) % 2 == 1) ^ _odd_sum(grid)[c >> 8]
    neg = torch.cat([neg, last[:, None]], 1)
    shift = torch.where(c & 1 == 1, 0.25, -0.25)
    return torch.where(neg, -a, a) + shift[:, None]


def e8p_decode(codes: torch.Tensor) -> torch.Tensor:
    """The codewords of int16 codes [...] (any integer dtype holding the 16 bits), float32 [..., 8]."""
    return e8p_table()[codes.long() & 0xFFFF]


def _best_for_shift(y: torch.Tensor, grid: torch.Tensor, norms: torch.Tensor, odd: torch.Tensor):
    """For y [n, 8] (already shifted): per vector the best score 2<y, c> - ||c||^2 over the codewords of
    one shift, the absolute pattern and the negative-sign mask achieving it."""
    ay = y.abs()
    neg = y < 0
    prods = ay[:, None, :] * grid[None]                               # [n, 256, 8]
    cheapest, where = prods.min(-1)                                   # the coordinate to flip if needed
    wrong = (neg.sum(-1, keepdim=True) % 2 == 1) != odd[None]         # [n, 256] parity mismatch
    score = 2 * (prods.sum(-1) - wrong * 2 * cheapest) - norms[None]
    best, idx = score.max(-1)
    rows = torch.arange(y.shape[0])
    flip = wrong[rows, idx]
    neg = neg.clone()
    j = where[rows, idx]
    neg[rows[flip], j[flip]] ^= True
    return best, idx, neg


def e8p_nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest E8P codeword to each row of x [..., 8], exactly: (codes int16 [...], codewords float32
    [..., 8]).

    For a shift t and an absolute pattern a, ||y - s ⊙ a||^2 with y = x - t is least for the signs s of y
    (s ⊙ a then has <y, s ⊙ a> = <|y|, a>) when their number of negatives has the parity sum(a) needs;
    otherwise the best admissible s flips the one coordinate i where the loss 2 |y_i| a_i is least. So
    65,536 distances become 2 x 256 scores of 8 terms each. Ties go to the lower pattern index and to +1/4."""
    if x.shape[-1] != DIM:
        raise LowbitError(f"E8P quantises vectors of {DIM} values, got a last dimension of {x.shape[-1]}")
    flat = x.reshape(-1, DIM).float()
    grid = e8p_abs_grid()
    norms, odd = grid.square().sum(-1), _odd_sum(grid)
    codes = torch.empty(flat.shape[0], dtype=torch.int64)
    for s in range(0, flat.shape[0], _CHUNK):
        part = flat[s:s + _CHUNK]
        best_p, idx_p, neg_p = _best_for_shift(part - 0.25, grid, norms, odd)
        best_m, idx_m, neg_m = _best_for_shift(part + 0.25, grid, norms, odd)
        # the score is 2<y, c> - ||c||^2 = ||y||^2 - ||y - c||^2: compare the distances, not the scores
        plus = ((part - 0.25).square().sum(-1) - best_p) <= ((part + 0.25).square().sum(-1) - best_m)
        idx = torch.where(plus, idx_p, idx_m)
        neg = torch.where(plus[:, None], neg_p, neg_m)
        bits = (neg[:, :DIM - 1].long() << (torch.arange(DIM - 1) + 1)).sum(-1)
        codes[s:s + _CHUNK] = (idx << 8) | bits | plus.long()
    codes = codes.reshape(x.shape[:-1])
    return to_int16(codes), e8p_table()[codes]


def to_int16(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 16-bit codes (int64) as int16 bit patterns."""
    return torch.where(codes >= 1 << 15, codes - CODES, codes).to(torch.int16)


@lru_cache(maxsize=1)
def e81b_table() -> torch.Tensor:
    """QuIP#'s 1-bit-per-weight residual codebook, float32 [256, 8]: 0, the 240 roots of E8 (112 of the form
    ±e_i ± e_j, 128 of (±1/2)^8 with an even number of minus signs), and ±2 e_i except -2 e_7."""
    roots = []
    for i, j in itertools.combinations(range(DIM), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * DIM
            v[i], v[j] = si, sj
            roots.append(v)
    halves = [list(s) for s in itertools.product((0.5, -0.5), repeat=DIM) if sum(v < 0 for v in s) % 2 == 0]
    twos = [[2.0 * s * (k == i) for k in range(DIM)] for s in (1, -1) for i in range(DIM)][:-1]
    return torch.tensor([[0.0] * DIM] + roots + halves + twos)


def e81b_nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of the 256-entry residual codebook to each row of x [..., 8] (brute force):
    (codes uint8 [...], codewords float32 [..., 8])."""
    table = e81b_table()
    flat = x.reshape(-1, DIM).float()
    idx = (2 * flat @ table.T - table.square().sum(-1)).argmax(-1)
    return idx.to(torch.uint8).reshape(x.shape[:-1]), table[idx].reshape(x.shape)
