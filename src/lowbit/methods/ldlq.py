"""BlockLDLQ (Tseng et al., 2024, "QuIP#", section 4.2; LDLQ from Chee et al., 2023, "QuIP"): GPTQ's error
feedback for a vector quantiser that rounds `b` input columns at a time.

With the block LDL decomposition H = L D L^T (L unit block-lower-triangular with b x b identity blocks on
its diagonal, D block diagonal), the columns are quantised in blocks from the last to the first:

    Ŵ_k = Q(W_k + sum_{j > k} (W_j - Ŵ_j) L_jk)

which minimises the proxy loss tr((W - Ŵ) H (W - Ŵ)^T) for the given rounding of each block (the
remaining error is (W - Ŵ) L, whose columns the quantiser bounds). With b = 1 this is GPTQ/OPTQ (QuIP's
theorem), run in the opposite column order. L and D come from one Cholesky factorisation H = C C^T:
L = C blockdiag(C_kk)^-1, D = blockdiag(C_kk C_kk^T).
"""
from __future__ import annotations

from typing import Callable

import torch

from lowbit.errors import LowbitError

DAMP_RETRIES = 6


def damped_cholesky(h: torch.Tensor, damp: float, warnings: list[str]) -> torch.Tensor:
    """The lower Cholesky factor of h + damp * mean(diag h) I, the dampening raised tenfold (up to six
    times) while h is not positive definite; dead inputs (H_ii = 0) get the mean diagonal first."""
    h = h.clone()
    diag = h.diagonal()
    dead = diag <= 0
    mean = float(diag[~dead].mean()) if (~dead).any() else 1.0
    diag[dead] = mean
    base = diag.clone()
    first = damp if damp > 0 else 1e-4
    for k, used in enumerate([damp] + [first * 10 ** k for k in range(1, DAMP_RETRIES + 1)]):
        diag.copy_(base + used * mean)
        c, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            if k:
                warnings.append(f"ldlq: Hessian not positive definite at damp {damp:g}; used damp {used:g}")
            return c
    raise LowbitError(f"the Hessian is not positive definite even with damp {used:g}")


def block_ldl(h: torch.Tensor, b: int, damp: float = 0.0, warnings: list[str] | None = None):
    """(L [n, n] unit block-lower-triangular, D [n / b, b, b]) with h (+ dampening) = L blockdiag(D) L^T."""
    n = h.shape[0]
    if n % b:
        raise LowbitError(f"block LDL in blocks of {b} needs a multiple of {b} columns, got {n}")
    c = damped_cholesky(h, damp, [] if warnings is None else warnings)
    nb = n // b
    k = torch.arange(nb)
    cb = c.reshape(nb, b, nb, b)[k, :, k, :]                              # the diagonal blocks C_kk
    eye = torch.eye(b, dtype=c.dtype).expand(nb, b, b)
    inv = torch.linalg.solve_triangular(cb, eye, upper=False)
    lower = torch.einsum("nkb,kbc->nkc", c.reshape(n, nb, b), inv).reshape(n, n)
    return lower, cb @ cb.transpose(1, 2)


def block_ldlq(w: torch.Tensor, lower: torch.Tensor, b: int, quantize: Callable):
    """Quantise w [out, in] in column blocks of b, last to first, with LDLQ's feedback through `lower` (from
    block_ldl). quantize(x [out, b], k) -> (values [out, b], codes: a tuple of tensors [out]), k the block's
    index (a quantiser may round blocks differently). Returns (Ŵ [out, in], per code stream a tensor
    [out, in / b])."""
    n_out, n_in = w.shape
    nb = n_in // b
    what = torch.zeros_like(w)
    err = torch.zeros_like(w)                    # W - Ŵ of the blocks done (zero elsewhere)
    streams: list[list[torch.Tensor]] = []
    for k in reversed(range(nb)):
        s, e = k * b, (k + 1) * b
        target = w[:, s:e] + err[:, e:] @ lower[e:, s:e]
        values, codes = quantize(target, k)
        what[:, s:e] = values
        err[:, s:e] = w[:, s:e] - values
        if not streams:
            streams = [[None] * nb for _ in codes]
        for stream, c in zip(streams, codes):
            stream[k] = c
    return what, [torch.stack(s, dim=1) for s in streams]


def block_refine(w, what, h, b: int, quantize: Callable, streams: list[torch.Tensor], passes: int):
    """QuIP#'s refinement passes after BlockLDLQ (the reference's quip_tune_iters): each block, last to first,
    is rounded again from its least-squares optimum given all the others, Ŵ_k + (W - Ŵ) H_:k H_kk^-1; a
    row takes the new codes only where tr((W - Ŵ) H (W - Ŵ)^T) falls, so the error never rises. what and
    streams are updated in place."""
    for _ in range(passes):
        r = (w - what) @ h                                               # (W - Ŵ) H, kept up to date
        for k in reversed(range(w.shape[1] // b)):
            s, e = k * b, (k + 1) * b
            hkk, rk = h[s:e, s:e], r[:, s:e]
            values, codes = quantize(what[:, s:e] + torch.linalg.solve(hkk, rk.T).T, k)
            delta = values - what[:, s:e]
            take = ((delta @ hkk) * delta).sum(1) - 2 * (delta * rk).sum(1) < 0
            delta[~take] = 0
            what[:, s:e] += delta
            for stream, c in zip(streams, codes):
                stream[take, k] = c[take]
            r -= delta @ h[s:e]
    return what, streams


def proxy_loss(w: torch.Tensor, what: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)^T), the layer's output error up to the factor of H's definition."""
    d = (w - what).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))
