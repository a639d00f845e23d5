"""Shared by the kernel tests: the instruction sets to run, and the tolerance of a product computed in
another order than the Python path's.

Bound: both paths sum k float32 terms, in different orders, so each is within gamma_k * sum|terms| of the
exact sum (Higham, Accuracy and Stability, section 3.1); the fused kernels also apply a block's scale
once to its sum and subtract a zero point (or ggml min) as scale * zero * sum(x), which adds terms of at
most |scale * zero| * |x| that cancel. So |y - y_ref| <= 2 * gamma_{k+2} * (|x| @ A^T) with A = |W| + |offset|
(offset = scale * zero, or ggml's dmin * m); we check 4 * (k + 2) * u * (|x| @ A^T), u = 2^-24, plus the
rounding of the bias addition (2u |y|); with bfloat16 compute, the output's roundings to bfloat16 (torch may
round the product and then the sum with the bias: up to three half-ulps between the two paths, 2^-6 |y|).
"""
from __future__ import annotations

import pytest
import torch

from lowbit.kernels import native

U32 = 2.0 ** -24


def buildable() -> bool:
    """Whether this machine should build the kernels: then a failed build is a failure, not a skip."""
    import os
    import platform

    disabled = os.environ.get("LOWBIT_KERNELS", "1").lower() in ("0", "off", "false", "no")
    return not disabled and native.compiler() is not None and platform.machine().lower() in ("x86_64", "amd64")


def kernels_or_skip():
    if native.library() is None:
        if buildable():
            pytest.fail(f"the CPU kernels did not build: {native.unavailable_reason()}")
        pytest.skip(f"lowbit CPU kernels unavailable: {native.unavailable_reason()}")


def isas() -> list[str]:
    lib = native.library()
    return native.supported_isas() if lib is not None else ["none"]


@pytest.fixture(params=isas())
def isa(request):
    """Each instruction set this CPU runs, restored to the best one afterwards."""
    kernels_or_skip()
    native.set_isa(request.param)
    yield request.param
    native.set_isa("auto")


def assert_accumulation_close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, magnitude: torch.Tensor,
                              bf16_output: bool = False, fp16_output: bool = False) -> None:
    """y and ref [..., n] from x [..., k]; magnitude [n, k] bounds each weight's terms (|W| + |offset|).
    fp16_output: float16 compute, whose output roundings add up to three half-ulps, 3 * 2^-11 |y|."""
    k = x.shape[-1]
    bound = 4 * (k + 2) * U32 * (x.float().abs() @ magnitude.float().T) + 2 * U32 * ref.float().abs()
    if bf16_output:
        bound = bound + 2.0 ** -6 * ref.float().abs()
    if fp16_output:
        bound = bound + 3 * 2.0 ** -11 * ref.float().abs()
    err = (y.float() - ref.float()).abs()
    worst = (err - bound).max()
    assert torch.isfinite(y).all() and worst <= 0, f"error exceeds the bound by {worst.item():.3g}"
