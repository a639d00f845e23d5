"""HQQ against closed forms (the shrinkage operator, the early stop, a weight already on its grid), against
the paper's iteration written out plainly, and (interop) against the hqq package per group on every
Linear of the bundled model and of all-MiniLM-L6-v2."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import HQQ, parse_method
from lowbit.errors import LowbitError
from lowbit.methods.hqq import hqq_optimize, hqq_quantize, shrink_lp


# ---------------------------------------------------------------------------------------------------
# The shrinkage operator

def test_shrink_at_p_1_is_the_soft_threshold():
    x = torch.linspace(-2, 2, 401)
    assert torch.allclose(shrink_lp(x, 4.0, 1.0), torch.sign(x) * (x.abs() - 0.25).clamp_min(0))


@given(st.floats(0.1, 1.0), st.floats(0.5, 100.0))
@settings(max_examples=50, deadline=None)
def test_shrink_zeroes_below_its_threshold_and_moves_toward_zero(p, beta):
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    y = shrink_lp(x, beta, p)
    threshold = beta ** (-1 / (2 - p))                 # |x| = |x|^(p-1) / beta
    assert torch.all(y[x.abs() < threshold * 0.999] == 0)
    assert torch.all(y.abs() <= x.abs()) and torch.all(y * x >= 0)
    assert torch.equal(shrink_lp(-x, beta, p), -y)
    big = x.abs() > threshold * 1.001
    assert torch.allclose(y[big], torch.sign(x[big]) * (x[big].abs() - x[big].abs() ** (p - 1) / beta))


# ---------------------------------------------------------------------------------------------------
# The iteration, written out as the paper states it

def paper_hqq(w: torch.Tensor, bits: int, lp=0.7, beta=10.0, kappa=1.01, iters=20):
    """Groups are the rows of w. Plain formulas: no shortcut, no scratch buffers."""
    qmax = 2 ** bits - 1
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    s = torch.where(hi - lo <= 1e-4, torch.ones_like(lo), qmax / (hi - lo)).clamp(max=2e4)
    z = -lo * s
    best, n = math.inf, 0
    for n in range(1, iters + 1):
        w_q = torch.round(w * s + z).clamp(0, qmax)
        w_r = (w_q - z) / s
        e = w - w_r
        w_e = torch.sign(e) * torch.relu(e.abs() - e.abs() ** (lp - 1) / beta)
        z_next = torch.mean(w_q - (w - w_e) * s, dim=1, keepdim=True)
        err = float((w - w_r).abs().mean())
        beta *= kappa
        z = z_next
        if not err < best:
            break
        best = err
    return torch.round(w * s + z).clamp(0, qmax), s, z, n


@pytest.mark.parametrize("bits,scale,group", [(4, 0.02, 64), (3, 0.05, 32), (2, 1.0, 16), (1, 3.0, 8), (8, 0.02, 128)])
def test_the_fast_step_is_the_papers_iteration(bits, scale, group):
    # heavy tails put residuals above the shrink threshold (clamped weights), where the full formula runs
    gen = torch.Generator().manual_seed(bits)
    w = torch.distributions.StudentT(2.0).sample((64, 256)) * scale
    w = w.reshape(-1, group)
    codes, inv, z, steps = hqq_optimize(w, bits, group)
    ref_codes, ref_inv, ref_z, ref_steps = paper_hqq(w, bits)
    assert steps == ref_steps and torch.equal(inv, ref_inv)
    assert torch.allclose(z, ref_z, rtol=1e-5, atol=1e-5)
    assert (codes != ref_codes).float().mean() < 1e-3      # only exact ties may round the other way
    del gen


def test_axis_0_takes_strided_groups_as_the_reference_does():
    w = torch.randn(64, 32) * 0.1
    codes, inv, z, _ = hqq_optimize(w, 4, 16, axis=0)
    assert codes.shape == (16, 128) and inv.shape == (1, 128)
    ref_codes, ref_inv, ref_z, _ = paper_hqq(w.reshape(16, 128).T.contiguous(), 4)
    assert torch.equal(codes.T, ref_codes) and torch.allclose(z.T, ref_z, atol=1e-6)


def test_early_stop_closed_form_a_weight_on_its_grid_stops_after_two_steps():
    # w = (q - z) / s exactly: the first step's error is 0, the second cannot fall below it
    levels = torch.arange(16.0).repeat(8, 4)[:, :64]
    w = (levels - 3.0) / 40.0
    codes, inv, z, steps = hqq_optimize(w, 4, 64)
    assert steps == 2
    assert torch.allclose((codes - z) / inv, w.reshape(-1, 64), atol=1e-7)


def test_iters_bounds_the_steps():
    w = torch.randn(32, 64)
    assert hqq_optimize(w, 2, 16, iters=1)[3] == 1
    assert hqq_optimize(w, 8, 64, iters=5)[3] <= 5


# ---------------------------------------------------------------------------------------------------
# The method

def test_default_scheme_and_short_names():
    m = parse_method("hqq-int4-g64")
    assert m == HQQ() and m.short_name() == "hqq-int4-g64" and not m.required_stats
    assert m.scheme.format == "uint4" and m.scheme.zero_dtype == "fp16" and not m.scheme.symmetric
    for name in ("hqq-int3-g64", "hqq-int2-g16", "hqq-int1-g32", "hqq-int8-g128", "hqq-int4-g64-scale",
                 "hqq-int4", "hqq-int4-g64-p0.5"):
        assert parse_method(name).short_name() == name
    assert HQQ(bits=3, group_size=32).short_name() == "hqq-int3-g32"


@pytest.mark.parametrize("name,message", [("hqq-int4-g64-sym", "asymmetric"), ("hqq-nf4", "asymmetric"),
                                          ("hqq-int4-tensor", "per group or per channel"),
                                          ("hqq-int4-g64-p1.5", "lp must be"), ("hqq-int4-g64-it0", "iters")])
def test_settings_it_cannot_take_are_one_line_errors(name, message):
    with pytest.raises(LowbitError, match=message) as e:
        parse_method(name)
    assert "\n" not in str(e.value)
    with pytest.raises(LowbitError, match="1..8 bits"):
        HQQ(bits=9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused(bad):
    w = torch.randn(8, 64)
    w[2, 3] = bad
    with pytest.raises(LowbitError, match="NaN" if math.isnan(bad) else "Inf"):
        HQQ().quantize_weight(w)
    with pytest.raises(LowbitError, match="does not divide"):
        HQQ().quantize_weight(torch.randn(8, 96))


def test_weight_bits_and_codes_nearest_to_the_stored_scale_and_zero():
    w = torch.randn(64, 256) * 0.05
    q = HQQ().quantize_weight(w)
    assert q.bits_per_element == 4 + 32 / 64 and q.spec.float_zero
    assert torch.equal(q.scale, q.scale.half().float()) and torch.equal(q.zero, q.zero.half().float())
    # every code is the nearest level under the stored pair: moving it by one never helps
    s, z = q.scale.repeat_interleave(64, 1), q.zero.repeat_interleave(64, 1)
    err = (w - q.dequantize()).abs()
    for step in (-1, 1):
        other = (q.codes.float() + step).clamp(0, 15)
        assert torch.all(err <= (w - (other - z) * s).abs() + 1e-7)


def test_hqq_beats_min_max_rounding_in_lp_error():
    from lowbit import RTN

    w = torch.distributions.StudentT(3.0).sample((128, 256)) * 0.02
    for bits, group in ((4, 64), (3, 64), (2, 16)):
        ours = (w - HQQ(bits=bits, group_size=group).quantize_weight(w).dequantize()).abs().pow(0.7).sum()
        rtn = RTN(bits=bits, group_size=group, symmetric=False, zero_dtype="fp16").quantize_weight(w)
        assert ours < (w - rtn.dequantize()).abs().pow(0.7).sum()


def test_float64_weights_come_back_in_float64():
    q = hqq_quantize(torch.randn(16, 64, dtype=torch.float64), HQQ().scheme)
    assert q.dequantize().dtype == torch.float64
