"""Fused kernels for QuantLinear (integer and 4-bit formats, groups, zero points, act-order) and Linear4bit
(bitsandbytes NF4/FP4, double quantisation), against each module's Python path, on every instruction set.

Decoded tiles are compared bit for bit; products within the accumulation-order bound of helpers.py.
"""
import pytest
import torch

from lowbit.core import QuantizedTensor, QuantSpec, quantize
from lowbit.methods.nf4 import quantize_4bit
from lowbit.nn import Linear4bit, QuantLinear
from tests.kernels.helpers import assert_accumulation_close, isa, kernels_or_skip  # noqa: F401

SPECS = {
    "int4-g128": QuantSpec("int4", "group", 128),
    "int4-g64": QuantSpec("int4", "group", 64),
    "int4-g32": QuantSpec("int4", "group", 32),
    "int4-g24": QuantSpec("int4", "group", 24),          # lanes of one chunk in several irregular groups
    "int4-g256": QuantSpec("int4", "group", 256),
    "uint4-g128-asym": QuantSpec("uint4", "group", 128, symmetric=False),
    "uint4-g32-asym-bf16": QuantSpec("uint4", "group", 32, symmetric=False, scale_dtype="bf16"),
    "uint4-g64-floatzero": QuantSpec("uint4", "group", 64, symmetric=False, zero_dtype="fp16"),
    "uint4-sym": QuantSpec("uint4", "group", 64),        # implied zero 8
    "int4-channel": QuantSpec("int4", "channel"),
    "int8-channel": QuantSpec("int8"),
    "int8-g32": QuantSpec("int8", "group", 32),
    "uint8-g64-asym": QuantSpec("uint8", "group", 64, symmetric=False),
    "uint8-channel-sym": QuantSpec("uint8", "channel"),
    "int8-tensor-fp32": QuantSpec("int8", "tensor", scale_dtype="fp32"),
    "int3-g64": QuantSpec("int3", "group", 64),
    "uint2-g32-asym": QuantSpec("uint2", "group", 32, symmetric=False),
    "nf4-g64": QuantSpec("nf4", "group", 64, scale_dtype="fp32"),
    "fp4-g32-e8m0": QuantSpec("fp4_e2m1", "group", 32, scale_dtype="e8m0"),
    "fp8-channel": QuantSpec("fp8_e4m3", "channel"),
}
# (out, in): whole chunks, a partial last chunk (tail), fewer columns than one chunk, odd row counts
SHAPES = [(64, 512), (37, 1152), (5, 96), (9, 200)]
ROWS = [1, 3, 6, 21]   # one activation row, a few (fused), more than GEMV_ROWS (decoded tiles + matmul)


def magnitude_affine(m: QuantLinear) -> torch.Tensor:
    q = m.quantized()
    w = m.dequantized_weight().abs()
    if m.spec.symmetric:
        return w
    per_block = (q.zero * q.scale).abs()
    return w + per_block.repeat_interleave(m.in_features // per_block.shape[1], 1)


def layer(name: str, shape, bias=True, seed=0) -> QuantLinear | None:
    spec = SPECS[name]
    n, k = shape
    if spec.group_size and k % spec.group_size:
        return None
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :8] *= 30                                   # a few outliers widen some groups
    return QuantLinear.from_quantized(quantize(w, spec), torch.randn(n, generator=g) if bias else None)


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantlinear_matches_python_path(isa, name, shape):  # noqa: F811
    m = layer(name, shape)
    if m is None:
        pytest.skip("group size does not divide the row")
    plan = m.build_plan()
    assert plan is not None
    assert torch.equal(plan.decode(0, m.out_features), m.dequantized_weight()[:, plan.order()])
    for rows in ROWS:
        x = torch.randn(rows, m.in_features, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            assert_accumulation_close(m(x), m.python_forward(x), x, magnitude_affine(m))


@pytest.mark.parametrize("name", ["int4-g128", "uint4-g32-asym-bf16", "int8-channel", "uint8-g64-asym", "int3-g64"])
def test_bf16_activations_round_each_weight_as_the_python_path(isa, name):  # noqa: F811
    m = layer(name, (40, 640))
    plan = m.build_plan()
    assert torch.equal(plan.decode(0, 40, 1), m.dequantized_weight().bfloat16().float()[:, plan.order()])
    for rows in (1, 4, 12):
        x = torch.randn(2, rows, 640, generator=torch.Generator().manual_seed(rows)).bfloat16()
        with torch.no_grad():
            y = m(x)
            assert y.dtype == torch.bfloat16 and y.shape == (2, rows, 40)
            assert_accumulation_close(y, m.python_forward(x), x, magnitude_affine(m), bf16_output=True)


def act_order_layer(n=24, k=384, group=128, seed=0) -> QuantLinear:
    """An int4 weight whose groups are scattered over the columns (GPTQ act-order: g_idx)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=g)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=g).half().float() + 0.01
    spec = QuantSpec("int4", "group", group)
    q = QuantizedTensor(codes, scale, torch.zeros_like(scale), spec, torch.float32, g_idx)
    return QuantLinear.from_quantized(q, torch.randn(n, generator=g))


def test_act_order_groups_run_fused_on_sorted_columns(isa):  # noqa: F811
    m = act_order_layer()
    plan = m.build_plan()
    assert plan is not None and plan.columns is not None
    for rows in (1, 3, 13):
        x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            assert_accumulation_close(m(x), m.python_forward(x), x, m.dequantized_weight().abs())


def test_act_order_with_uneven_groups_keeps_the_python_path():
    kernels_or_skip()
    m = act_order_layer()
    m.g_idx[:5] = 0                                   # group 0 now has more than group_size columns
    assert m.build_plan() is None
    x = torch.randn(2, 384)
    with torch.no_grad():
        assert torch.equal(m(x), m.python_forward(x))


BNB = [(nf, dq, bs) for nf in ("nf4", "fp4") for dq in (False, True) for bs in (32, 64, 128)]


@pytest.mark.parametrize("quant_type,double_quant,block", BNB, ids=lambda v: str(v))
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear4bit_matches_python_path(isa, quant_type, double_quant, block, compute):  # noqa: F811
    g = torch.Generator().manual_seed(block)
    n, k = 45, 640
    w = torch.randn(n, k, generator=g) * 0.05
    m = Linear4bit.from_quantized(quantize_4bit(w, block, quant_type, double_quant), torch.randn(n, generator=g),
                                  compute)
    plan = m.build_plan()
    exact = m.dequantized_weight(torch.float32)
    assert torch.equal(plan.decode(0, n), exact[:, plan.order()])
    for rows in ROWS:
        x = torch.randn(rows, k, generator=g)
        with torch.no_grad():
            assert_accumulation_close(m(x), m.python_forward(x), x, exact.abs(), bf16_output=compute == torch.bfloat16)


def test_linear4bit_blocks_across_rows_keep_the_python_path():
    kernels_or_skip()
    w = torch.randn(6, 96) * 0.05                      # 96 columns: 64-blocks straddle rows
    m = Linear4bit.from_quantized(quantize_4bit(w, 64, "nf4", False), None, torch.float32)
    assert m.build_plan() is None
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(m(x), m.python_forward(x))
