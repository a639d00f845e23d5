"""int8 x int8 -> int32 matmul, and the int8 quantisation of activations that feeds it.

`int8_matmul(a, w)` computes a @ w^T with a [..., K] and w [N, K] both int8, accumulated in int32:
- "int_mm": torch._int_mm. On CPU it is a real int8 kernel with AVX-512 (VNNI), about 5x faster than a
  float32 matmul on this project's build machine; without AVX-512 torch falls back to a scalar loop slower
  than float (and torch < 2.6 could overflow there), so it is only chosen with AVX-512. On CUDA it needs
  more than 16 rows and K, N multiples of 8.
- "reference": the same integers multiplied in float64. Exact: every product has |a_i w_i| <= 2^14 and a
  sum of K < 2^17 of them stays below 2^31 < 2^53, so every partial sum is an integer float64 holds
  exactly, and the result equals int32 accumulation bit for bit.
K is capped at MAX_K so that even int32 accumulation of (-128) * (-128) products cannot overflow.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from lowbit.errors import LowbitError

QMAX = 127
MAX_K = (2 ** 31 - 1) // (128 * 128)   # 131071 products of the largest magnitude fit an int32
BACKENDS = ("int_mm", "reference")


@lru_cache(maxsize=None)
def _cpu_int_mm_is_fast() -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def _int_mm_runs(a2: torch.Tensor, w: torch.Tensor) -> bool:
    if a2.device.type == "cpu":
        return _cpu_int_mm_is_fast()
    if a2.device.type == "cuda":
        m, k = a2.shape
        return m > 16 and k % 8 == 0 and w.shape[0] % 8 == 0
    return False


def default_backend(a: torch.Tensor, w: torch.Tensor) -> str:
    return "int_mm" if _int_mm_runs(a.reshape(-1, a.shape[-1]), w) else "reference"


def int8_matmul_reference(a2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a2.to(torch.float64), w.to(torch.float64).T).to(torch.int32)


def int8_matmul(a: torch.Tensor, w: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """a [..., K] int8 times w [N, K] int8, transposed: int32 [..., N], accumulated exactly."""
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise LowbitError(f"int8_matmul takes int8 operands, got {a.dtype} and {w.dtype}")
    if a.shape[-1] != w.shape[-1]:
        raise LowbitError(f"int8_matmul: inner dimensions differ ({a.shape[-1]} vs {w.shape[-1]})")
    if a.shape[-1] > MAX_K:
        raise LowbitError(f"int8_matmul: K = {a.shape[-1]} could overflow int32 accumulation (max {MAX_K})")
    a2 = a.reshape(-1, a.shape[-1])
    backend = backend or default_backend(a2, w)
    if backend not in BACKENDS:
        raise LowbitError(f"unknown int8 backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "int_mm":
        out = torch._int_mm(a2.contiguous(), w.T)
    else:
        out = int8_matmul_reference(a2, w)
    return out.reshape(*a.shape[:-1], w.shape[0])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (per token): codes int8 [T, K] and float32 scales [T] with x ≈ codes * scale.
    A row of zeros gets scale 1 (any scale represents it)."""
    x = x.float()
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale[..., None]), -QMAX, QMAX).to(torch.int8), scale


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of x under a given (static) scale; values beyond the calibrated range saturate."""
    return torch.clamp(torch.round(x.float() / scale), -128, QMAX).to(torch.int8)
