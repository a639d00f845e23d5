"""The quantisation equation: error bounds (property based), sizes, errors for bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import QuantSpec, block_shape, quantize
from lowbit.errors import LowbitError

GRANULARITY_CASES = [("tensor", None), ("channel", None), ("token", None), ("group", 8), ("group", 16)]


@st.composite
def tensors(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.sampled_from([16, 32, 48]))
    scale = draw(st.floats(1e-3, 1e3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["normal", "uniform", "heavy", "positive"]))
    if kind == "normal":
        x = torch.randn(rows, cols, generator=g)
    elif kind == "uniform":
        x = torch.rand(rows, cols, generator=g) * 2 - 1
    elif kind == "heavy":
        x = torch.randn(rows, cols, generator=g) / (torch.rand(rows, cols, generator=g) + 0.01)
    else:
        x = torch.rand(rows, cols, generator=g) + 0.5
    return x * scale


def element_scales(q):
    rows, groups, size = block_shape(q.shape, q.spec)
    return q.scale[..., None].expand(rows, groups, size).reshape(q.shape)


@settings(max_examples=150, deadline=None)
@given(x=tensors(), bits=st.integers(2, 8), signed=st.booleans(), symmetric=st.booleans(),
       gran=st.sampled_from(GRANULARITY_CASES), scale_dtype=st.sampled_from(["fp32", "fp16", "bf16"]))
def test_error_at_most_half_a_step_inside_the_range(x, bits, signed, symmetric, gran, scale_dtype):
    spec = QuantSpec(f"{'int' if signed else 'uint'}{bits}", gran[0], gran[1], symmetric, scale_dtype)
    try:
        q = quantize(x, spec)
    except LowbitError as e:
        # a step wider than fp16's largest value cannot be stored: refused, never silently Inf
        assert "overflows fp16" in str(e) and float(x.abs().max()) / (2 ** (bits - 1) - 1) > 6.5e4
        return
    err = (x - q.dequantize()).abs()
    s = element_scales(q)
    # min-max observer: every element is inside the clipping range, so all obey the bound
    assert torch.all(err <= s / 2 * (1 + 1e-5) + 1e-30), float((err / s).max())


@settings(max_examples=60, deadline=None)
@given(x=tensors(), name=st.sampled_from(["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]),
       gran=st.sampled_from(GRANULARITY_CASES))
def test_float_formats_error_within_half_ulp(x, name, gran):
    spec = QuantSpec(name, gran[0], gran[1], scale_dtype="fp32")
    q = quantize(x, spec)
    fmt = spec.number_format
    s = element_scales(q)
    scaled = (x / s).abs()
    exponent = torch.clamp(torch.floor(torch.log2(torch.clamp(scaled, min=1e-30))), min=fmt.min_exponent)
    half_ulp = torch.pow(2.0, exponent - fmt.man_bits) / 2
    err = (x - q.dequantize()).abs() / s
    assert torch.all(err <= half_ulp * (1 + 1e-4) + 1e-6)


def test_int4_g128_storage_is_4_125_bits():
    w = torch.randn(256, 1024)
    q = quantize(w, QuantSpec("int4", "group", 128, symmetric=True, scale_dtype="fp16"))
    assert q.bits_per_element == 4.125
    assert q.nbytes == 256 * 1024 // 2 + 256 * 8 * 2
    qa = quantize(w, QuantSpec("uint4", "group", 128, symmetric=False))
    assert qa.bits_per_element == 4 + 20 / 128


def test_stored_scale_is_representable_and_never_clips():
    w = torch.randn(64, 64) * 0.37
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        q = quantize(w, QuantSpec("int8", scale_dtype=dtype))
        assert torch.equal(q.scale.to(torch_dtype).float(), q.scale)
        assert torch.all(q.scale * 127 >= w.abs().amax(1, keepdim=True))
    q = quantize(w, QuantSpec("fp4_e2m1", "group", 32, scale_dtype="e8m0"))
    assert torch.all(torch.log2(q.scale) == torch.round(torch.log2(q.scale)))


def test_asymmetric_uses_the_whole_unsigned_grid():
    x = torch.linspace(0.0, 1.5, 16).reshape(1, 16)
    q = quantize(x, QuantSpec("uint4", "channel", symmetric=False, scale_dtype="fp32"))
    assert q.codes.tolist() == [list(range(16))]
    assert torch.allclose(q.dequantize(), x)


def test_dequantize_keeps_dtype_and_shape():
    w = torch.randn(8, 4, 32, dtype=torch.bfloat16)
    q = quantize(w, QuantSpec("int8", "group", 32))
    assert q.dequantize().dtype == torch.bfloat16 and q.dequantize().shape == w.shape


@pytest.mark.parametrize("x,spec,message", [
    (torch.randn(4, 100), QuantSpec("int4", "group", 64), "group size 64 does not divide the row length 100"),
    (torch.tensor([[1.0, math.nan]]), QuantSpec("int8"), "NaN"),
    (torch.tensor([[1.0, math.inf]]), QuantSpec("int8"), "Inf"),
    (torch.empty(0, 4), QuantSpec("int8"), "empty"),
    (torch.randn(8), QuantSpec("int8", "channel"), "at least 2 dims"),
])
def test_bad_input_is_a_clear_value_error(x, spec, message):
    with pytest.raises(ValueError, match=message):
        quantize(x, spec)


@pytest.mark.parametrize("kwargs,message", [
    (dict(format="int9"), "unknown number format"),
    (dict(format="int4", granularity="group"), "group_size"),
    (dict(format="int4", granularity="row"), "granularity"),
    (dict(format="fp8_e4m3", symmetric=False), "asymmetric"),
    (dict(format="int4", scale_dtype="fp64"), "scale_dtype"),
])
def test_bad_spec_is_a_clear_error(kwargs, message):
    with pytest.raises(LowbitError, match=message):
        QuantSpec(**kwargs)


def test_same_input_same_bytes():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec("int4", "group", 32)
    a, b = quantize(w, spec, "mse"), quantize(w, spec, "mse")
    assert torch.equal(a.packed_codes(), b.packed_codes()) and torch.equal(a.scale, b.scale)
