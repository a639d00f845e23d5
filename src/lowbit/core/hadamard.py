"""The randomised Hadamard transform of QuIP# (Tseng et al., 2024, section 3): x -> H (s ⊙ x) / sqrt(n), with
s a random ±1 vector and H an n x n Hadamard matrix (entries ±1, H H^T = n I), so the map is orthogonal.

H for n = 2^k m is the Kronecker product H_{2^k} ⊗ H_m of Sylvester's matrix (applied by the fast
Walsh-Hadamard butterflies, O(n log n)) and, when m > 1, a Paley matrix of order m = q + 1 for a prime
q ≡ 3 (mod 4) (12, 20, 24, 44, 48, 60, ...; applied as a small m x m product). QuIP#'s reference keeps a
table of such small matrices for the same purpose. No padding: a dimension with no such factorisation
(e.g. 56 = 2^3 x 7, or 28 x 2^k) is a one-line LowbitError.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from lowbit.errors import LowbitError

MAX_PALEY = 256


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


@lru_cache(maxsize=None)
def paley(m: int) -> torch.Tensor:
    """Paley's construction I of a Hadamard matrix of order m = q + 1, q prime, q ≡ 3 mod 4 (float32 [m, m]):
    with the Jacobsthal matrix Q_ij = χ(j - i) (χ the quadratic character mod q), H = I + S, where S is the
    skew matrix [[0, 1^T], [-1, Q]]."""
    q = m - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise LowbitError(f"Paley's construction gives orders q + 1 for a prime q ≡ 3 mod 4, not {m}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if d in squares else -1.0 for d in range(1, q)])
    idx = torch.arange(q)
    s = torch.zeros(m, m)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
    return torch.eye(m) + s


def hadamard_factor(n: int) -> int:
    """The odd-order factor m of n = 2^k m used for H_n (1 when n is a power of two), or a LowbitError."""
    for m in range(1, min(n, MAX_PALEY) + 1):          # the smallest factor: most of H by butterflies
        p = n // m
        if n % m == 0 and p & (p - 1) == 0 and (m == 1 or (m % 4 == 0 and _is_prime(m - 1))):
            return m
    raise LowbitError(f"no Hadamard matrix of order {n} here: the randomised Hadamard transform takes 2^k or "
                      f"2^k x (q + 1), q a prime ≡ 3 mod 4 (12, 20, 24, 44, ...), e.g. 768 = 64 x 12")


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x H over the last dimension (a power of two), H Sylvester's unnormalised matrix (symmetric)."""
    n = x.shape[-1]
    shape = x.shape
    h = 1
    while h < n:
        y = x.reshape(-1, n // (2 * h), 2, h)
        x = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return x.reshape(shape)


def hadamard(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x H_n^T / sqrt(n) over the last dimension of x (x H_n / sqrt(n) with transpose), H_n = H_{2^k} ⊗ H_m:
    row vectors mapped by the orthogonal H_n / sqrt(n) (or its transpose, the inverse)."""
    n = x.shape[-1]
    m = hadamard_factor(n)
    shape = x.shape
    if m > 1:
        hm = paley(m).to(x.dtype)
        x = (x.reshape(*shape[:-1], n // m, m) @ (hm if transpose else hm.T)).transpose(-1, -2)
        x = fwht(x).transpose(-1, -2)                 # Sylvester's factor acts on the 2^k index
    else:
        x = fwht(x)
    return x.reshape(shape) / n ** 0.5


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """n random signs ±1 (float32) from a seeded generator."""
    return torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1


def rht(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The randomised Hadamard transform of the rows of x [..., n]: x D_s H^T / sqrt(n), i.e. each row r
    becomes H (s ⊙ r) / sqrt(n)."""
    return hadamard(x * signs)


def rht_inverse(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The inverse of `rht` on rows: y H / sqrt(n) ⊙ s."""
    return hadamard(y, transpose=True) * signs


def rht_both(w: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """U w V^T-style transform of a matrix w [out, in] on both sides: V w U^T, U = H_in D_in / sqrt(in),
    V = H_out D_out / sqrt(out). A Hessian transforms as U h U^T: rht_both(h, s_in, s_in)."""
    return rht(rht(w, s_in).T, s_out).T


def rht_both_inverse(wr: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """The inverse of rht_both: V^T wr U."""
    return rht_inverse(rht_inverse(wr, s_in).T, s_out).T
