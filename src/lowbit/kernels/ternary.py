"""BitNet b1.58's matmul: int8 activations (per token, absmax) times ternary weights, with no multiplications.

Source: Ma et al. 2024, "The Era of 1-bit LLMs" (b1.58), and the authors' training notes ("The Era of 1-bit
LLMs: Training Tips, Code and FAQ", 2024): activations x are scaled per token to s = 127 / max|x| and rounded,
x ~ round(x * s) / s; weights are gamma * codes, codes in {-1, 0, +1}. Then

    y[t, n] = (sum_k xq[t, k] * codes[n, k]) * gamma / s[t]

and the integer sum needs only additions and subtractions: add xq[t, k] where codes[n, k] = +1, subtract it
where codes[n, k] = -1 (ternary_matmul_reference). ternary_matmul computes the same integers with a float32
matmul, exact as long as every partial sum stays below 2**24 (|xq| <= 128, so for K < 2**17 inputs).
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError

ACT_LEVELS = 127            # int8 activations: round(x * 127 / max|x|), clamped to [-128, 127]
ACT_EPS = 1e-5              # max|x| is clamped to this, as the reference code does (an all-zero row stays zero)
EXACT_K = 1 << 17           # below this many inputs the float32 path is exact
REFERENCE_CHUNK = 1 << 22   # elements of the [tokens, outputs, inputs] selection materialised at once


def int8_scale(x: torch.Tensor) -> torch.Tensor:
    """s = 127 / max(max |x| over the last dim, eps): [..., 1] float32, per token."""
    return ACT_LEVELS / x.detach().float().abs().amax(-1, keepdim=True).clamp(min=ACT_EPS)


def quantize_tokens_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq int8 [..., K], s float32 [..., 1]) with x ~ xq / s, per token (last dim) by absmax."""
    s = int8_scale(x)
    return torch.clamp(torch.round(x.float() * s), -128, 127).to(torch.int8), s


def ternary_matmul_reference(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Integer y [T, N] = sum over k of xq[T, K] * codes[N, K] for codes in {-1, 0, +1}, computed with additions
    and subtractions only: selections of xq summed in int64. Slow; the reference ternary_matmul is tested
    against. Rows of codes are taken a chunk at a time so that at most REFERENCE_CHUNK elements are live."""
    if xq.dim() != 2 or codes.dim() != 2 or xq.shape[1] != codes.shape[1]:
        raise LowbitError(f"ternary matmul takes xq [T, K] and codes [N, K], got {tuple(xq.shape)} and "
                          f"{tuple(codes.shape)}")
    if xq.is_floating_point():
        raise LowbitError("the multiplication-free reference takes integer activations (quantize_tokens_int8)")
    x = xq.to(torch.int64).unsqueeze(1)                       # [T, 1, K]
    plus, minus = (codes == 1).unsqueeze(0), (codes == -1).unsqueeze(0)
    step = max(1, REFERENCE_CHUNK // max(1, xq.numel()))
    zero = torch.zeros((), dtype=torch.int64)
    parts = [torch.where(plus[:, n:n + step], x, zero).sum(-1) - torch.where(minus[:, n:n + step], x, zero).sum(-1)
             for n in range(0, codes.shape[0], step)]
    return torch.cat(parts, -1) if parts else torch.zeros(xq.shape[0], 0, dtype=torch.int64)


def ternary_matmul(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The same integers as ternary_matmul_reference, as float32 [T, N], by a float32 matmul (exact for
    K < EXACT_K: every product is an integer of at most 8 bits and every partial sum stays below 2**24)."""
    if xq.shape[-1] >= EXACT_K:
        raise LowbitError(f"the float32 ternary matmul is exact for fewer than {EXACT_K} inputs, got {xq.shape[-1]}")
    return xq.float() @ codes.float().t()


def bitlinear(x: torch.Tensor, codes: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None,
              matmul=ternary_matmul) -> torch.Tensor:
    """BitNet b1.58's linear layer at inference: x [..., K] float, codes [N, K], gamma the weight scale ->
    [..., N] float32 = (xq @ codes.T) * gamma / s (+ bias), xq, s from quantize_tokens_int8."""
    lead = x.shape[:-1]
    xq, s = quantize_tokens_int8(x.reshape(-1, x.shape[-1]))
    y = matmul(xq, codes).float() * (gamma.float() / s)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, codes.shape[0])
