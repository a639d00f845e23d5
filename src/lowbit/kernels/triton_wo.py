"""Weight-only 4-bit matmul for GPUs in Triton: y = x W^T straight from packed 4-bit codes.

The GPU counterpart of lowbit.kernels.fused: the same description of a weight (affine_plan's arguments:
a 4-bit code stream, a 16-entry level table, per-group scales, optional zero points) covers QuantLinear's
int4 / uint4 / NF4 / FP4 groups and bitsandbytes' Linear4bit blocks (high nibble first, nested absmax).
One program computes a [BLOCK_M, BLOCK_N] tile of y: for each BLOCK_K slice of the input it loads the
packed bytes of BLOCK_N rows (BLOCK_K / 2 bytes each), splits them into codes, looks each code's level up
in the table, applies the group's scale (and zero point) in float32, and multiplies with tl.dot in the
activations' dtype (float16 / bfloat16 tensor cores, or float32), accumulating in float32. The float
weight never exists in memory; a tile of it lives in registers. BLOCK_K divides the group size, so one
scale serves a row of a slice (the AWQ / GPTQ / bitsandbytes layouts: groups of 32..128 or whole rows).

Needs the `triton` package and a CUDA tensor; `TRITON_INTERPRET=1` (set before this module is imported)
runs the same kernel on CPU tensors through Triton's interpreter, which is how tests/kernels/test_triton.py
checks it on machines without a GPU. Unsupported weights (other bit widths, groups no BLOCK_K divides)
return None from `gpu_affine_plan`, and the module keeps its Python path.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from lowbit.kernels.fused import NoCopy

BLOCK_KS = (128, 64, 32, 16)     # tl.dot needs K >= 16; the first that divides the group is used


def available() -> bool:
    """Whether Triton is installed (a GPU is still needed unless TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def wo4(x_ptr, c_ptr, lut_ptr, s_ptr, z_ptr, y_ptr, M, N, K, GROUPS, G,
            HAS_Z: tl.constexpr, HI_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
        # int64 offsets: rows x k and rows x n pass 2^31 on large layers (a 128K vocabulary head)
        rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        half = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            b = tl.load(c_ptr + rn[:, None] * (K // 2) + (k0 // 2 + half)[None, :], mask=rn[:, None] < N, other=0)
            lo, hi = b & 15, b >> 4
            codes = tl.reshape(tl.join(hi, lo) if HI_FIRST else tl.join(lo, hi), (BLOCK_N, BLOCK_K))
            levels = tl.load(lut_ptr + codes.to(tl.int32))
            g = k0 // G
            s = tl.load(s_ptr + rn * GROUPS + g, mask=rn < N, other=0.0)
            if HAS_Z:
                z = tl.load(z_ptr + rn * GROUPS + g, mask=rn < N, other=0.0)
                w = (levels - z[:, None]) * s[:, None]
            else:
                w = levels * s[:, None]
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee") if x.dtype == tl.float32 else \
                tl.dot(x, tl.trans(w.to(x.dtype)))
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    return wo4


class GPUPlan(NoCopy):
    """A 4-bit weight [n, k] as the Triton kernel reads it (see gpu_affine_plan)."""

    def __init__(self, codes, lut, scales, zeros, n: int, k: int, group: int, hi_first: bool, block_k: int):
        self.codes, self.lut, self.scales, self.zeros = codes, lut, scales, zeros
        self.n, self.k, self.group, self.hi_first, self.block_k = n, k, group, hi_first, block_k
        self.columns = None   # int64 [k]: act-order column order (set by the module, as for the CPU plans)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """x [..., k] -> [..., n] in x's dtype; the product in compute_dtype (default x's): float16,
        bfloat16 or float32, each weight rounded to it as the Python path rounds it; None otherwise."""
        compute = compute_dtype or x.dtype
        if compute not in (torch.float16, torch.bfloat16, torch.float32) or x.device != self.codes.device:
            return None
        if self.columns is not None:
            x = x.index_select(-1, self.columns.to(x.device))
        x2 = x.reshape(-1, self.k).to(compute).contiguous()
        m = x2.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float32, device=x.device)
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n = 64
        grid = ((m + block_m - 1) // block_m, (self.n + block_n - 1) // block_n)
        zeros = self.zeros if self.zeros is not None else self.scales
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():   # launch on x's GPU, not the current one
            _kernel()[grid](x2, self.codes, self.lut, self.scales, zeros, y, m, self.n, self.k, self.k // self.group,
                            self.group, HAS_Z=self.zeros is not None, HI_FIRST=self.hi_first, BLOCK_M=block_m,
                            BLOCK_N=block_n, BLOCK_K=self.block_k, num_warps=4, num_stages=2)
        if bias is not None:   # the bias in compute_dtype, added before the product is rounded (once), as addmm does
            y += bias.to(compute).float()
        return y.to(compute).to(x.dtype).reshape(*x.shape[:-1], self.n)


def gpu_affine_plan(codes: torch.Tensor, bits: int, n: int, k: int, group: int, levels: torch.Tensor,
                    scales: torch.Tensor, zeros: torch.Tensor | None = None, zero_add: float = 0.0,
                    int8_kind: int = 0, hi_first: bool = False, bnb_double_quant: tuple | None = None) -> GPUPlan | None:
    """lowbit.kernels.fused.affine_plan's description of w[r, c] = (levels[code] - zero[r, g]) * scale[r, g],
    for the Triton kernel, on the codes' device. 4-bit codes only; scales become float32 [n, k // group]
    (bitsandbytes' nested absmax decoded once: 4 bytes per block); integer zero codes float32 likewise.
    None when the weight is not one the kernel takes, or Triton is missing."""
    if bits != 4 or k % 2 or k % group or not available():
        return None
    block_k = next((b for b in BLOCK_KS if group % b == 0), None)
    if block_k is None:
        return None
    groups = k // group
    if bnb_double_quant is not None:
        from lowbit.weights.bnb4 import double_dequantize
        _, nested, offset = bnb_double_quant   # decoded on the CPU (its code table lives there), once
        s = double_dequantize(scales.cpu(), nested.cpu(), offset.cpu()).to(scales.device)
    else:
        s = scales.float()
    s = s.reshape(n, groups).contiguous()
    z = None
    if zeros is not None:
        if zeros.dtype == torch.uint8:   # a `bits`-bit stream of integer zero codes (plus zero_add)
            from lowbit.core import unpack_bits
            z = unpack_bits(zeros, bits, n * groups).float() + zero_add
        else:
            z = zeros.float()
        z = z.reshape(n, groups).contiguous()
    return GPUPlan(codes.reshape(n, k // 2).contiguous(), levels.float().contiguous().to(codes.device), s, z, n, k,
                   group, hi_first, block_k)
