"""LLM.int8(): against bitsandbytes' own int8 ops, against the decomposition's closed form, in the pipeline."""
import copy

import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.methods import parse_method
from lowbit.methods.llm_int8 import LLMInt8
from lowbit.methods.w8a8 import int8_weight
from lowbit.nn.w8a8 import Int8MixedLinear, outlier_fraction, reset_outlier_counts
from lowbit.pipeline.outliers import make_outlier_variant
from tests.conftest import build_tiny_model

GEN = torch.Generator().manual_seed(0)


def activations_with_outlier_columns(rows=24, cols=64, hot=(5, 9, 40)):
    """Every row of the hot columns reaches the threshold, so "an outlier element" and "an outlier column"
    select the same values (bitsandbytes zeroes the former before its row absmax, LLM.int8() the latter)."""
    x = torch.randn(rows, cols, generator=GEN)
    x = x.clamp(-5.5, 5.5)
    for c in hot:
        sign = torch.where(torch.rand(rows, generator=GEN) < 0.5, -1.0, 1.0)
        x[:, c] = sign * (6.0 + 30 * torch.rand(rows, generator=GEN))
    return x


def test_weight_codes_and_scales_equal_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 128, generator=GEN) * 0.05
    cb, scb, _ = F.int8_vectorwise_quant(w.clone())
    q = int8_weight(w)
    assert torch.equal(q.codes.view(torch.int8), cb)
    assert torch.allclose(q.scale.reshape(-1) * 127, scb, rtol=1e-6)


def test_outlier_columns_and_output_match_bitsandbytes_mixed_matmul():
    pytest.importorskip("bitsandbytes")
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(32, 64, generator=GEN) * 0.05
    bias = torch.randn(32, generator=GEN)
    x = activations_with_outlier_columns()
    cb, scb, _ = F.int8_vectorwise_quant(w.clone())
    ca, sca, cols = F.int8_vectorwise_quant(x.clone(), threshold=6.0)
    expected, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(x, ca, cb, sca, scb, cols, bias)
    m = Int8MixedLinear.from_quantized(int8_weight(w), bias, threshold=6.0)
    assert m.outlier_columns(x).tolist() == cols.tolist() == [5, 9, 40]
    # bitsandbytes dequantises with the constant 6.200124e-05 where 1/127^2 = 6.2000124e-05: 1.8e-5 relative
    assert float((m(x) - expected).abs().max()) <= 4e-5 * float(expected.abs().max())


def test_without_threshold_it_is_vector_wise_int8_as_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(32, 64, generator=GEN) * 0.05
    x = torch.randn(12, 64, generator=GEN) * 3
    cb, scb, _ = F.int8_vectorwise_quant(w.clone())
    ca, sca, _ = F.int8_vectorwise_quant(x.clone())
    expected = torch.ops.bitsandbytes.int8_scaled_mm(ca, cb, sca, scb, dtype=torch.float32)
    m = Int8MixedLinear.from_quantized(int8_weight(w), threshold=0.0)
    # identical integers; bitsandbytes' epilogue multiplies by 6.200124e-05 instead of 1/127^2
    assert torch.allclose(m(x) * (6.200124e-05 * 127 * 127), expected, rtol=1e-6, atol=1e-6)
    assert m.outlier_fraction == 0.0


def test_decomposition_closed_form_and_outlier_fraction():
    """y = Q8(x with outlier columns zeroed) W8^T + x[:, O] W8[:, O]^T, and |O| / in is the fraction."""
    w = torch.randn(16, 64, generator=GEN) * 0.1
    x = activations_with_outlier_columns(rows=10)
    q = int8_weight(w)
    m = Int8MixedLinear.from_quantized(q, threshold=6.0)
    w8 = q.dequantize().double()
    regular = x.clone()
    regular[:, [5, 9, 40]] = 0
    amax = regular.abs().amax(1, keepdim=True).double()
    xq = torch.round(regular.double() / (amax / 127)) * (amax / 127)
    expected = xq @ w8.T + x[:, [5, 9, 40]].double() @ w8[:, [5, 9, 40]].T
    assert torch.allclose(m(x).double(), expected, rtol=1e-5, atol=1e-5)
    m(torch.zeros(3, 64))   # no outliers in this call
    assert m.outlier_fraction == pytest.approx(3 / 128)


def test_model_level_fraction_and_reset():
    model = torch.nn.Sequential(Int8MixedLinear.from_quantized(int8_weight(torch.randn(8, 64, generator=GEN))))
    model(activations_with_outlier_columns(rows=4))
    assert outlier_fraction(model) == pytest.approx(3 / 64)
    reset_outlier_counts(model)
    assert outlier_fraction(model) == 0.0


def test_on_the_outlier_variant_decomposition_beats_plain_int8():
    # outliers at the norms only: in a random model the v_proj / up_proj outputs are too small for a 60x
    # channel to reach the threshold 6, which is a real limit of LLM.int8() but not what this test is about
    base = make_outlier_variant(build_tiny_model("llama"), channels=(3, 17, 40), factor=60.0, inner_channels=())
    calib = torch.randint(0, 512, (8, 48), generator=GEN)
    ids = torch.randint(0, 512, (2, 48), generator=GEN)
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    errors = {}
    for name in ("llm-int8", "llm-int8-t0", "w8a8"):
        model = api.quantize(copy.deepcopy(base), parse_method(name), calibration=calib, progress=False)
        reset_outlier_counts(model)
        with torch.no_grad():
            out = model(input_ids=ids).logits
        errors[name] = float((out - ref).norm() / ref.norm())
        if name == "llm-int8":
            # 3 of 64 columns into q/k/v and gate/up; none into o_proj and down_proj: 4 * 3/64 / 7 per block
            assert outlier_fraction(model) == pytest.approx(4 * 3 / 64 / 7, rel=0.1)
    # measured: 0.036 against 0.104 for both int8 without decomposition
    assert errors["llm-int8"] < errors["llm-int8-t0"] / 2.5
    assert errors["llm-int8"] < errors["w8a8"] / 2.5


def test_config_checks_and_names():
    assert parse_method("llm-int8") == LLMInt8() and parse_method("llm-int8-t4.5") == LLMInt8(4.5)
    assert LLMInt8(4.5).short_name() == "llm-int8-t4.5"
    with pytest.raises(LowbitError, match="threshold"):
        LLMInt8(-1.0)
    with pytest.raises(LowbitError, match="tN"):
        parse_method("llm-int8-fast")
