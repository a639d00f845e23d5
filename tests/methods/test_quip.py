"""QuIP# (methods/quip.py) and BlockLDLQ (methods/ldlq.py): against closed forms (block LDL reconstructs H;
LDLQ with blocks of one column is GPTQ; with H = I it is nearest rounding of the rotated weight), against
GPTQ and RTN at 2 bits on the same Hessian, and its module against the dense equivalent."""
from __future__ import annotations

import pytest
import torch

from lowbit import GPTQ, QuIP, parse_method
from lowbit.core.hadamard import random_signs, rht_both
from lowbit.errors import LowbitError
from lowbit.formats.e8 import e8p_nearest
from lowbit.methods.gptq import gptq_quantize, round_to_nearest
from lowbit.methods.ldlq import block_ldl, block_ldlq, proxy_loss
from lowbit.methods.quip import quip_quantize
from lowbit.nn import QuipLinear
from tests.methods.helpers import check_module


def problem(n_out=64, n_in=128, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, n_in, generator=gen) @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=gen))
    x[:, 3] *= 8
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    return w.to(dtype), (2 / x.shape[0] * x.T @ x).to(dtype)


def relative(w, q, h) -> float:
    return proxy_loss(w, q, h) / proxy_loss(w, torch.zeros_like(w), h)


def test_block_ldl_reconstructs_h():
    _, h = problem(dtype=torch.float64)
    lower, d = block_ldl(h, 8)
    eye_blocks = lower.reshape(16, 8, 16, 8)[torch.arange(16), :, torch.arange(16), :]
    assert torch.allclose(eye_blocks, torch.eye(8, dtype=torch.float64).expand(16, 8, 8), atol=1e-12)
    assert torch.allclose(torch.triu(lower, 1), torch.zeros_like(lower), atol=1e-12)   # block lower triangular
    assert torch.allclose(lower @ torch.block_diag(*d) @ lower.T, h, atol=1e-9)


def test_ldlq_with_blocks_of_one_column_is_gptq():
    # QuIP's theorem: LDLQ is OPTQ. GPTQ visits columns first to last, LDLQ last to first: reverse them.
    w, h = problem(dtype=torch.float64)
    ref = gptq_quantize(w, h, GPTQ(bits=3, group_size=None, act_order=False, clip=False, damp=0.0))
    scale = ref.scale[:, 0].double()

    def rounding(x, k):
        levels = torch.round(x[:, 0] / scale).clamp(-4, 3)
        return (levels * scale)[:, None], (levels,)
    lower, _ = block_ldl(h.flip(0, 1), 1)
    what, _ = block_ldlq(w.flip(1), lower, 1, rounding)
    assert torch.equal(what.flip(1), ref.dequantize().double())


def test_identity_hessian_is_nearest_rounding_of_the_rotated_weight():
    w, _ = problem()
    q = quip_quantize(w, torch.eye(128), QuIP(damp=0.0))
    gen = torch.Generator().manual_seed(0)
    su, sv = random_signs(128, gen), random_signs(64, gen)
    wr = rht_both(w.double(), su.double(), sv.double())
    scale = float(wr.square().mean().sqrt()) / 1.03
    codes, _ = e8p_nearest((wr / scale).reshape(64, 16, 8))
    assert torch.equal(q.codes, codes) and torch.equal(q.su, su) and torch.equal(q.sv, sv)
    assert torch.allclose(q.transformed(), torch.tensor(scale) * q.transformed() / q.scale, atol=1e-6)


def test_two_bits_beat_gptq_and_rtn_and_more_bits_do_better():
    w, h = problem()
    errors = {b: relative(w, quip_quantize(w, h, QuIP(bits=b)).dequantize(), h) for b in (2, 3, 4)}
    gptq2 = relative(w, gptq_quantize(w, h, GPTQ(bits=2, group_size=64)).dequantize(), h)   # 2.25 bits/weight
    rtn2 = relative(w, round_to_nearest(w, GPTQ(bits=2, group_size=64)).dequantize(), h)
    no_feedback = relative(w, quip_quantize(w, torch.eye(128), QuIP()).dequantize(), h)
    assert errors[2] < 0.7 * gptq2 < rtn2 and errors[2] < 0.8 * no_feedback
    assert errors[4] < 0.5 * errors[3] < 0.25 * errors[2]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_module_is_the_dense_equivalent_and_round_trips(bits):
    w, h = problem()
    q = quip_quantize(w, h, QuIP(bits=bits))
    # bits per weight from the stored tensors: codes, a sign per input and output, the fp32 scale
    assert q.bits == bits and q.codes.dtype == torch.int16
    assert q.bits_per_element == bits + (128 + 64 + 32) / (64 * 128)
    check_module(q, QuipLinear, 128, 64, slack_bits=16)


@pytest.mark.parametrize("name", ["quip-2.5bit", "quip-3.25bit", "quip-3.75bit"])
def test_fractional_bits_module_and_size(name):
    """bits + plus: round(plus x blocks) blocks carry the finer residual, one bit marks each block."""
    w, h = problem()
    config = parse_method(name)
    q = quip_quantize(w, h, config)
    n_hi = round(config.plus * 16)
    lo, hi = {2: 0, 3: 8}[config.bits], {2: 8, 3: 16}[config.bits]
    assert int(q.hi.sum()) == n_hi and q.bits == config.bits
    assert q.storage_bits == 64 * (16 * 16 + lo * (16 - n_hi) + hi * n_hi) + 16 + 128 + 64 + 32
    check_module(q, QuipLinear, 128, 64, slack_bits=16)


def test_fractional_bits_go_to_the_blocks_that_weigh_most():
    """The finer blocks are the top tr(D_k) (D_k = H_kk minus what earlier blocks explain: a Schur
    complement of the rotated H), and they lower the error by more than their share of the bits: between
    quip-3bit and quip-4bit, and below the line joining them."""
    w, h = problem()
    q = quip_quantize(w, h, QuIP(bits=3, plus=0.5, damp=0.0))
    su = random_signs(128, torch.Generator().manual_seed(0)).double()
    hr = rht_both(h.double(), su, su)
    traces = torch.tensor([float((hr[s:s + 8, s:s + 8] - (hr[s:s + 8, :s] @ torch.linalg.solve(
        hr[:s, :s], hr[:s, s:s + 8]) if s else 0)).trace()) for s in range(0, 128, 8)])
    assert torch.equal(q.hi, traces > traces.sort().values[7])     # 16 blocks, 8 finer: the top half
    errors = {n: relative(w, quip_quantize(w, h, parse_method(n)).dequantize(), h)
              for n in ("quip-3bit", "quip-3.25bit", "quip-3.5bit", "quip-3.75bit", "quip-4bit")}
    assert list(errors.values()) == sorted(errors.values(), reverse=True)
    assert errors["quip-3.5bit"] < (errors["quip-3bit"] + errors["quip-4bit"]) / 2


def test_same_seed_same_bytes():
    w, h = problem(n_out=32, n_in=64)
    a, b = quip_quantize(w, h, QuIP(seed=3)), quip_quantize(w, h, QuIP(seed=3))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.su, b.su) and torch.equal(a.scale, b.scale)
    assert not torch.equal(a.su, quip_quantize(w, h, QuIP(seed=4)).su)


def test_short_names_and_bad_settings():
    assert parse_method("quip") == QuIP() and QuIP().short_name() == "quip"
    for name in ("quip-3bit", "quip-4bit-damp0.1", "quip-seed2", "quip-scale0.9", "quip-tune1", "quip-2.5bit",
                 "quip-3.75bit-tune1"):
        assert parse_method(name).short_name() == name
    assert parse_method("quip-3.5bit") == QuIP(bits=3, plus=0.5)
    for bad in ({"bits": 4, "plus": 0.5}, {"bits": 3, "plus": 1.0}, {"bits": 2, "plus": -0.1}):
        with pytest.raises(LowbitError, match="one bit finer"):
            QuIP(**bad)
    for name, message in (("quip-5bit", "unrecognised word"), ("quip-scale0", "opt_scale"),
                          ("quip-4.5bit", "unrecognised word")):
        with pytest.raises(LowbitError, match=message):
            parse_method(name)
    with pytest.raises(LowbitError, match="2, 3 or 4 bits"):
        QuIP(bits=5)


def test_bad_input_is_a_one_line_error():
    w, h = problem()
    with pytest.raises(LowbitError, match="needs a Hessian"):
        QuIP().quantize_weight(w, None)
    with pytest.raises(LowbitError, match="no Hadamard matrix of order 56"):
        quip_quantize(torch.randn(56, 128), h, QuIP())
    with pytest.raises(LowbitError, match="8 inputs at a time"):
        quip_quantize(torch.randn(64, 20), torch.eye(20), QuIP())
    w[1, 2] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        quip_quantize(w, h, QuIP())


def test_refinement_passes_never_raise_the_error():
    w, h = problem()
    errors = [relative(w, quip_quantize(w, h, QuIP(tune=t)).dequantize(), h) for t in (0, 1)]
    assert errors[1] < errors[0]
    with pytest.raises(LowbitError, match="tune"):
        QuIP(tune=-1)


def test_fractional_rates_with_refinement_and_odd_block_counts():
    """tune passes keep each block on its own codebook (the error only falls); with 6 blocks a quarter is
    1.5, rounded up to 2; the scale is that of the codebook at least half the blocks use."""
    w, h = problem()
    errors = [relative(w, quip_quantize(w, h, QuIP(bits=3, plus=0.5, tune=t)).dequantize(), h) for t in (0, 1)]
    assert errors[1] < errors[0]
    w, h = w[:, :48], h[:48, :48]
    q = {n: quip_quantize(w, h, parse_method(n)) for n in ("quip-3bit", "quip-3.25bit", "quip-3.5bit", "quip-4bit")}
    assert int(q["quip-3.25bit"].hi.sum()) == 2 and int(q["quip-3.5bit"].hi.sum()) == 3
    assert torch.equal(q["quip-3.25bit"].scale, q["quip-3bit"].scale)
    assert torch.equal(q["quip-3.5bit"].scale, q["quip-4bit"].scale)


def test_finer_blocks_bad_input_is_a_one_line_error():
    from dataclasses import replace

    w, h = problem()
    q = quip_quantize(w, h, parse_method("quip-3.5bit"))
    for bad in ({"hi": q.hi.long()}, {"hi": torch.zeros_like(q.hi)}, {"resid_hi": q.resid_hi.to(torch.uint8)},
                {"hi": None}, {"resid_hi": q.resid_hi[:, :-1]}):
        with pytest.raises(LowbitError, match="finer blocks"):
            replace(q, **bad)
    config = QuipLinear.from_weight(q).layer_config()
    for bad in ({"finer_blocks": -1}, {"finer_blocks": 17}, {"bits": 4}, {"finer_blocks": 8.5}, {"finer_blocks": "8"}):
        with pytest.raises(ValueError, match="finer_blocks"):
            QuipLinear.from_layer_config({**config, **bad})
    with pytest.raises(KeyError):
        QuipLinear.from_layer_config({k: v for k, v in config.items() if k != "resid_scale_hi"})
    with pytest.raises(LowbitError, match="0.25, 0.5, 0.75"):
        QuIP(bits=3, plus=0.3)
