"""The Triton weight-only 4-bit kernel (lowbit.kernels.triton_wo) against the modules' Python paths.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors: the same
program, tile by tile, so layout, masking, nibble order, table lookup, scales, zero points and the
compute dtype are checked here; speed is for benchmarks/gpu_wo.py on a GPU. The bound is the fused CPU
kernels' (tests/kernels/helpers.py): both sides sum k float32 products in different orders.
"""
from __future__ import annotations

import os

import pytest
import torch

from lowbit.core import QuantSpec, quantize
from lowbit.kernels import triton_wo
from lowbit.methods.nf4 import quantize_4bit
from lowbit.nn import Linear4bit, QuantLinear
from tests.kernels.helpers import assert_accumulation_close

pytestmark = pytest.mark.skipif(not triton_wo.available(), reason="triton is not installed")

SPECS = {
    "int4-g128": QuantSpec("int4", "group", 128),
    "int4-g32": QuantSpec("int4", "group", 32),
    "int4-channel": QuantSpec("int4"),
    "uint4-g64-asym": QuantSpec("uint4", "group", 64, symmetric=False),
    "nf4-g64": QuantSpec("nf4", "group", 64, scale_dtype="fp32"),
}
ROWS = [1, 5, 20, 70]      # BLOCK_M 16 / 32 partly used; 70 rows: two tiles of 64


@pytest.fixture
def interpret():
    """The kernel on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
    on machines without a GPU before Triton is first imported)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (a GPU machine: benchmarks/gpu_wo.py runs the kernel there)")


def magnitude(m) -> torch.Tensor:
    w = m.dequantized_weight().float().abs()
    if isinstance(m, QuantLinear) and not m.spec.symmetric:
        q = m.quantized()
        w = w + (q.zero * q.scale).abs().repeat_interleave(m.in_features // q.scale.shape[1], 1)
    return w


@pytest.mark.parametrize("name", SPECS)
# bfloat16 runs on a GPU only: Triton 3.9's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest)
# and its bfloat16 tl.dot is wrong, so here the half-precision case is float16.
@pytest.mark.parametrize("compute", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_quantlinear(interpret, name, compute, one_thread):
    g = torch.Generator().manual_seed(0)
    n, k = 48, 256                                   # 48 rows: one BLOCK_N tile, partly masked
    m = QuantLinear.from_quantized(quantize(torch.randn(n, k, generator=g) * 0.05, SPECS[name]),
                                   torch.randn(n, generator=g))
    plan = m.build_plan(make=triton_wo.gpu_affine_plan)
    assert plan is not None
    for rows in ROWS:
        x = torch.randn(rows, k, generator=g).to(compute)
        with torch.no_grad():
            y, ref = plan.matmul(x, m.bias), m.python_forward(x)
        assert y.dtype == compute and y.shape == ref.shape
        assert_accumulation_close(y, ref, x, magnitude(m), fp16_output=compute == torch.float16)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("compute", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_linear4bit(interpret, quant_type, double_quant, compute, one_thread):
    g = torch.Generator().manual_seed(1)
    n, k = 70, 192
    m = Linear4bit.from_quantized(quantize_4bit(torch.randn(n, k, generator=g) * 0.05, 64, quant_type, double_quant),
                                  torch.randn(n, generator=g), compute)
    plan = m.build_plan(make=triton_wo.gpu_affine_plan)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=g)
        with torch.no_grad():
            y, ref = plan.matmul(x, m.bias, m.compute_dtype), m.python_forward(x)
        assert_accumulation_close(y, ref, x, m.dequantized_weight(torch.float32).abs(),
                                  fp16_output=compute == torch.float16)


def test_weights_the_kernel_does_not_take_keep_the_python_path():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 96, generator=g)
    odd_groups = QuantLinear.from_quantized(quantize(w, QuantSpec("int4", "group", 24)))   # no BLOCK_K divides 24
    three_bit = QuantLinear.from_quantized(quantize(w, QuantSpec("int3", "group", 32)))
    assert odd_groups.build_plan(make=triton_wo.gpu_affine_plan) is None
    assert three_bit.build_plan(make=triton_wo.gpu_affine_plan) is None
