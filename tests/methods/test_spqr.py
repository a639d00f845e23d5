"""SpQR against closed forms (H = I: no error feedback, so the grid, the statistics and the outliers can be
written down), against GPTQ on the same Hessian, and its module against the dense equivalent."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit import GPTQ, SpQR, parse_method
from lowbit.errors import LowbitError
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.spqr import loo_gain, spqr_quantize
from lowbit.nn import SpQRLinear
from tests.methods.helpers import check_module


def problem(n_out=64, n_in=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, n_in, generator=gen) @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=gen))
    x[:, 3] *= 8                                                  # an input channel with much energy
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    w[5, 17], w[40, 99] = 0.9, -0.7                               # planted outlier weights
    return w, 2 / x.shape[0] * x.T @ x


def output_error(w, q, h) -> float:
    d = (w - q).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


def quantize_stat(x, bits=3, group=16):
    """The second level, written out: min-max over `group` rows, fp16 scale and zero, nearest code."""
    b = x.reshape(-1, group)
    lo, hi = b.amin(1, keepdim=True), b.amax(1, keepdim=True)
    s = ((hi - lo) / (2 ** bits - 1)).half().float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = (-lo / ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-30)).half().float()
    z = torch.where(hi > lo, z, (-lo).half().float())
    return ((torch.round(b / s + z).clamp(0, 2 ** bits - 1) - z) * s).reshape(x.shape)


def test_identity_hessian_closed_form():
    # H = I: nothing is fed back; each group of 16 is min-max rounded on second-level quantised statistics,
    # and a weight is an outlier when ((w - q) R_jj)^2 > tau, R_jj = sqrt(1 + damp).
    w, _ = problem()
    config = SpQR(outlier_threshold=0.5, loo=False, damp=0.0)
    q = spqr_quantize(w, torch.eye(128), config)
    g = w.reshape(64, 8, 16)
    lo, hi = g.amin(-1), g.amax(-1)
    scale, zero = (hi - lo) / 7, -lo / ((hi - lo) / 7)
    scale, zero = quantize_stat(scale.T.contiguous()).T, quantize_stat(zero.T.contiguous()).T
    base = (torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 7) - zero[..., None]) * scale[..., None]
    base = base.reshape(64, 128)
    tau = 0.5 * float(w.var(dim=0).mean())
    outliers = (w - base).square() > tau
    assert torch.allclose(q.base(), base, atol=1e-6)
    assert torch.equal(q.dequantize() != q.base(), outliers) and outliers.any()
    assert torch.allclose(q.dequantize()[outliers], w[outliers], atol=1e-4)   # fp16 corrections
    # without leave-one-out a planted outlier widens its group's range and sits on the top code itself
    assert not outliers[5, 17]


def test_loo_gain_closed_form():
    # one row [0, 1, 2, 3, 100] at 2 bits: leaving 100 out makes the others exact, so its gain is the
    # row's whole error; leaving out an inner weight does not shrink the range, so it gains only its own.
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 100.0]])
    gain = loo_gain(x, torch.ones(5), 2)
    grid = torch.round(x / (100 / 3)) * (100 / 3)
    total = float((grid - x).square().sum())
    assert math.isclose(float(gain[0, 4]), total, rel_tol=1e-5)
    assert torch.all(gain[0, 1:4] <= (grid - x)[0, 1:4].square() + 1e-4)


def test_without_outliers_it_is_gptq_on_its_grid():
    # threshold inf and 8-bit statistics: GPTQ's column loop on the uint3 g16 grid (the range as it is,
    # float zeros), so the output error is GPTQ's on the same Hessian, far below rounding to nearest
    w, h = problem()
    spqr = spqr_quantize(w, h, SpQR(outlier_threshold=math.inf, stat_bits=8))
    gptq = gptq_quantize(w, h, GPTQ(bits=3, group_size=16, symmetric=False, zero_dtype="fp16"))
    rtn = spqr_quantize(w, torch.diag(torch.diag(h)), SpQR(outlier_threshold=math.inf, stat_bits=8))
    e_spqr, e_gptq, e_rtn = (output_error(w, q.dequantize(), h) for q in (spqr, gptq, rtn))
    assert spqr.n_outliers == 0
    assert e_spqr < 1.1 * e_gptq and e_spqr < 0.8 * e_rtn


def test_outliers_lower_the_error_and_cost_32_bits_each():
    w, h = problem()
    base = spqr_quantize(w, h, SpQR(outlier_threshold=math.inf))
    errors, bits = [], []
    for t in (1.0, 0.2, 0.05):
        q = spqr_quantize(w, h, SpQR(outlier_threshold=t))
        out, n_in = q.shape
        expected = 3 + (3 + 3) / 16 + 2 * 32 / (16 * 16) + (32 * (out + 1) + 32 * q.n_outliers) / (out * n_in)
        assert math.isclose(q.bits_per_element, expected, rel_tol=1e-12)
        errors.append(output_error(w, q.dequantize(), h))
        bits.append(q.bits_per_element)
    assert errors[0] < output_error(w, base.dequantize(), h) and errors == sorted(errors, reverse=True)
    assert bits == sorted(bits)


def test_planted_outliers_are_kept():
    w, h = problem()
    q = spqr_quantize(w, h, SpQR())
    deq = q.dequantize()
    assert 0 < q.outlier_fraction < 0.05
    # leave-one-out keeps them out of their groups' ranges, so they are stored as outliers (the value
    # GPTQ's updates made of them by then)
    sparse = deq != q.base()
    assert sparse[5, 17] and sparse[40, 99]
    assert abs(float(deq[5, 17]) - 0.9) < 0.05 and abs(float(deq[40, 99]) + 0.7) < 0.05


@pytest.mark.parametrize("act_order", [False, True])
def test_module_is_the_dense_equivalent_and_round_trips(act_order):
    w, h = problem()
    q = spqr_quantize(w, h, SpQR(act_order=act_order))
    assert (q.g_idx is not None) == act_order
    check_module(q, SpQRLinear, 128, 64)


def test_short_names_and_bad_settings():
    assert parse_method("spqr") == SpQR() and SpQR().short_name() == "spqr-int3-g16"
    for name in ("spqr-int3-g16-t0.1", "spqr-int4-g32-actorder", "spqr-int3-g16-noloo-sb4-sg32"):
        assert parse_method(name).short_name() == name
    for name, message in (("spqr-int3-g16-sym", "asymmetric"), ("spqr-int3", "in groups"),
                          ("spqr-int3-g16-t0", "outlier_threshold"), ("spqr-int3-g16-sb9", "stat_bits")):
        with pytest.raises(LowbitError, match=message):
            parse_method(name)


def test_bad_input_is_a_one_line_error():
    w, h = problem()
    with pytest.raises(LowbitError, match="needs a Hessian"):
        SpQR().quantize_weight(w, None)
    w[1, 2] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        spqr_quantize(w, h, SpQR())
    with pytest.raises(LowbitError, match="second-level group"):
        spqr_quantize(torch.randn(24, 128), h, SpQR())
    with pytest.raises(LowbitError, match="does not divide"):
        spqr_quantize(torch.randn(64, 120), torch.eye(120), SpQR())


def test_without_calibration_the_pipeline_refuses_in_one_line_before_any_work():
    from tests.conftest import build_tiny_model

    import lowbit

    model = build_tiny_model("llama")
    with pytest.raises(LowbitError, match="needs calibration activations") as e:
        lowbit.quantize(model, "spqr", progress=False)
    assert "\n" not in str(e.value)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
