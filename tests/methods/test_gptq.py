"""GPTQ against an independent, slow transcription of the paper's algorithm, and against RTN."""
import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods import METHODS, RTN, LayerStats, parse_method
from lowbit.methods.gptq import GPTQ, gptq_quantize, round_to_nearest


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The column loop runs thousands of small ops; on a shared 2-core machine, threads that wait on
    each other cost far more than they save at these sizes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# The reference: Algorithm 1 of the GPTQ paper, one column at a time with no lazy batching, with
# U = Cholesky(H^-1) (upper) as the paper and its code compute it; grids written out from their
# definitions (scale 2 absmax / (2^b - 1) when symmetric, (max - min) / (2^b - 1) with an integer zero
# otherwise), scales rounded up to fp16 as lowbit stores them.

def fp16_round_up(s: torch.Tensor) -> torch.Tensor:
    s = s.float()
    h = s.half()
    up = torch.nextafter(h, torch.tensor(math.inf, dtype=torch.float16))
    return torch.where(h.float() < s, up, h).float()


def ref_params(cols: torch.Tensor, bits: int, sym: bool):
    """cols [out, g] -> (scale, zero, qmin, qmax) per row."""
    lo = torch.clamp(cols.min(1).values, max=0).float()
    hi = torch.clamp(cols.max(1).values, min=0).float()
    if sym:
        amax = torch.maximum(-lo, hi)
        scale = amax / (2 ** (bits - 1) - 0.5)
        scale = fp16_round_up(torch.where(scale > 0, scale, torch.ones_like(scale)))
        return scale, torch.zeros_like(scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = (hi - lo) / (2 ** bits - 1)
    scale = fp16_round_up(torch.where(scale > 0, scale, torch.ones_like(scale)))
    zero = torch.clamp(-torch.round(lo / scale), 0, 2 ** bits - 1)
    return scale, zero, 0, 2 ** bits - 1


def reference_gptq(W, H, bits=4, group=None, sym=True, act_order=False, static=False, damp=0.01):
    """Returns (integer levels [out, in] in the original column order, scales [out, n_groups] in the
    order the groups were reached, g_idx or None)."""
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    g = group or n
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(n)
    static_params = [ref_params(W[:, k:k + g], bits, sym) for k in range(0, n, g)]
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    levels = torch.zeros_like(W)
    scales = []
    for i in range(n):
        if static or g == n:
            scale, zero, qmin, qmax = static_params[int(perm[i]) // g]
        elif i % g == 0:
            scale, zero, qmin, qmax = ref_params(W[:, i:i + g], bits, sym)
            scales.append(scale)
        w = W[:, i]
        lv = torch.clamp(torch.round(w / scale + zero), qmin, qmax)
        q = (lv - zero) * scale
        levels[:, i] = lv
        err = (w - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    if static or g == n:
        scales = [p[0] for p in static_params]
    g_idx = None
    if act_order and not static and g < n:
        g_idx = torch.empty(n, dtype=torch.int32)
        g_idx[perm] = (torch.arange(n) // g).to(torch.int32)
    return levels[:, torch.argsort(perm)], torch.stack(scales, 1), g_idx


def correlated_problem(out, n, seed, tokens=None, spread=0.5, mixing=1.0):
    """A weight and H = 2/N X^T X of correlated inputs with log-normal channel energies."""
    gen = torch.Generator().manual_seed(seed)
    tokens = tokens or 4 * n
    mix = mixing * torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n) + torch.eye(n, dtype=torch.float64)
    energy = torch.exp(spread * torch.randn(n, generator=gen, dtype=torch.float64))
    X = (torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix) * energy
    H = 2.0 / tokens * X.T @ X
    W = torch.randn(out, n, generator=gen, dtype=torch.float64) * 0.05
    return W, H, X


def output_error(W, Wq, H):
    d = (W.double() - Wq.double())
    return float(torch.einsum("oi,ij,oj->", d, H.double(), d))


def levels_of(qt):
    return qt.spec.number_format.decode(qt.codes)


# ---------------------------------------------------------------------------------------------------
# Identical codes to the reference

CASES = [
    dict(bits=4, group=16, block=32),                      # several blocks and sub-blocks, groups inside
    dict(bits=4, group=32, block=16),                      # groups spanning blocks
    dict(bits=4, group=24, block=32),                      # neither divides: blocks realigned to groups
    dict(bits=3, group=16, block=128),                     # one block
    dict(bits=2, group=32, block=32),
    dict(bits=8, group=16, block=32),
    dict(bits=4, group=None, block=32),                    # per channel
    dict(bits=4, group=16, block=32, sym=False),
    dict(bits=3, group=None, block=16, sym=False),
    dict(bits=4, group=16, block=32, act_order=True),
    dict(bits=4, group=16, block=32, act_order=True, sym=False),
    dict(bits=4, group=16, block=32, static=True),
    dict(bits=4, group=16, block=32, act_order=True, static=True),
    dict(bits=3, group=None, block=32, act_order=True),
]


@pytest.mark.parametrize("seed, case", list(enumerate(CASES)), ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
                         if isinstance(c, dict) else str(c))
def test_identical_codes_to_the_paper_algorithm(seed, case):
    W, H, _ = correlated_problem(24, 96, seed=seed)
    cfg = GPTQ(bits=case["bits"], group_size=case["group"], symmetric=case.get("sym", True),
               act_order=case.get("act_order", False), static_groups=case.get("static", False),
               block_size=case["block"], clip=False)
    qt = gptq_quantize(W, H, cfg)
    ref_levels, ref_scales, ref_g_idx = reference_gptq(
        W, H, case["bits"], case["group"], case.get("sym", True), case.get("act_order", False),
        case.get("static", False))
    assert torch.equal(levels_of(qt), ref_levels.float()), \
        f"{int((levels_of(qt) != ref_levels.float()).sum())} codes differ"
    assert torch.equal(qt.scale, ref_scales)
    if ref_g_idx is None:
        assert qt.g_idx is None
    else:
        assert torch.equal(qt.g_idx, ref_g_idx)


def test_float32_matches_float64_closely():
    """The fast float32 path against the float64 one: codes agree except for a few near-ties."""
    W, H, _ = correlated_problem(64, 256, seed=7)
    q32 = gptq_quantize(W.float(), H.float(), GPTQ(group_size=64))
    q64 = gptq_quantize(W, H, GPTQ(group_size=64))
    assert (q32.codes != q64.codes).float().mean() < 0.01
    assert output_error(W, q32.dequantize(), H) == pytest.approx(output_error(W, q64.dequantize(), H), rel=0.02)


# ---------------------------------------------------------------------------------------------------
# Better than RTN, on the objective it minimises

@pytest.mark.parametrize("cfg", [GPTQ(), GPTQ(act_order=False, static_groups=False), GPTQ(static_groups=False),
                                 GPTQ(act_order=False), GPTQ(bits=3),
                                 GPTQ(bits=2, group_size=64, act_order=True), GPTQ(symmetric=False),
                                 GPTQ(group_size=None), GPTQ(mse=True), GPTQ(clip=False), GPTQ(full_grid=False),
                                 GPTQ(scheme="nf4-g64"), GPTQ(scheme="fp4_e2m1-g32")],
                         ids=lambda c: c.short_name() + ("" if c.full_grid else "-nofullgrid"))
def test_output_error_about_half_of_rtn(cfg):
    W, H, _ = correlated_problem(128, 512, seed=3, spread=0.5, mixing=3.0)
    W, H = W.float(), H.float()
    gptq_err = output_error(W, gptq_quantize(W, H, cfg).dequantize(), H)
    same_grid_rtn = output_error(W, round_to_nearest(W, cfg).dequantize(), H)
    core_rtn = output_error(W, RTN(scheme=cfg.scheme).quantize_weight(W).dequantize(), H)
    assert gptq_err < 0.65 * same_grid_rtn
    assert gptq_err < 0.65 * core_rtn


def test_act_order_rescues_low_bits_with_uneven_channels():
    """Without act-order, error fed onto low-energy columns inflates their group scales: at 2 bits
    with channel energies spread over two orders of magnitude GPTQ then loses to RTN (a property of
    the algorithm, reproduced by the reference above); visiting high-energy columns first fixes it."""
    W, H, _ = correlated_problem(128, 512, seed=3, spread=1.0, mixing=3.0)
    paper = dict(act_order=False, static_groups=False)
    cfg = GPTQ(bits=2, group_size=64, **paper)
    rtn = output_error(W, round_to_nearest(W, cfg).dequantize(), H)
    plain = output_error(W, gptq_quantize(W, H, cfg).dequantize(), H)
    ordered = output_error(W, gptq_quantize(W, H, GPTQ(bits=2, group_size=64, static_groups=False)).dequantize(), H)
    assert plain > rtn > 2 * ordered
    for bits in (3, 4):
        plain = output_error(W, gptq_quantize(W, H, GPTQ(bits=bits, **paper)).dequantize(), H)
        ordered = output_error(W, gptq_quantize(W, H, GPTQ(bits=bits, static_groups=False)).dequantize(), H)
        assert ordered < 0.6 * plain < 0.6 * output_error(W, round_to_nearest(W, GPTQ(bits=bits)).dequantize(), H)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_hessian_clipping_beats_weight_space_clipping_on_the_output_error(bits):
    """clip: each static group's range shrunk for the least output error through H's diagonal block;
    with one heavy input column and channel energies spread out, below mse's and min-max's."""
    W, H, _ = correlated_problem(64, 256, seed=4, spread=1.0, mixing=1.0)
    W, H = W.float(), H.float()
    W[:, 3] *= 8
    err = {name: output_error(W, gptq_quantize(W, H, GPTQ(bits=bits, group_size=64, **kw)).dequantize(), H)
           for name, kw in (("minmax", {"clip": False}), ("mse", {"mse": True}), ("clip", {}))}
    assert err["clip"] < err["mse"] and err["clip"] < 0.8 * err["minmax"], err


def test_without_full_grid_rtn_fallback_is_core_rtn():
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    for sym in (True, False):
        ours = round_to_nearest(W, GPTQ(full_grid=False, symmetric=sym))
        core = RTN(bits=4, group_size=128, symmetric=sym).quantize_weight(W)
        assert torch.equal(ours.codes, core.codes) and torch.equal(ours.scale, core.scale)
        assert torch.equal(ours.zero, core.zero)


def test_full_grid_step_and_error_bound():
    """2^b - 1 steps span [-absmax, absmax] (scale rounded up to fp16), every error within half a step."""
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    qt = round_to_nearest(W, GPTQ(bits=4))
    amax = W.abs().reshape(64, 2, 128).amax(-1)
    assert torch.equal(qt.scale, fp16_round_up(amax / 7.5))
    step = qt.scale.repeat_interleave(128, dim=1)
    assert ((W - qt.dequantize()).abs() <= step / 2 + 1e-6).all()
    assert levels_of(qt).max() == 7


# ---------------------------------------------------------------------------------------------------
# Degenerate Hessians: dead inputs, not positive definite, no tokens

def test_dead_inputs_are_rounded_not_zeroed():
    W, H, X = correlated_problem(32, 128, seed=5)
    dead = torch.tensor([3, 40, 41, 100])
    X[:, dead] = 0
    H = 2.0 / X.shape[0] * X.T @ X
    for cfg in (GPTQ(group_size=32, act_order=False, static_groups=False), GPTQ(group_size=32, static_groups=False),
                GPTQ(group_size=32, clip=False)):
        qt = gptq_quantize(W, H, cfg)
        Wq = qt.dequantize()
        assert torch.isfinite(Wq).all()
        # a dead column's error is never fed back, so it is plain rounding: within half a step
        g = torch.arange(128) // 32 if qt.g_idx is None else qt.g_idx.long()
        step = qt.scale[:, g[dead]]
        assert ((W[:, dead] - Wq[:, dead]).abs() <= step / 2 + 1e-7).all()
        assert (Wq[:, dead] != 0).any()
        assert output_error(W, Wq, H) < output_error(W, round_to_nearest(W, cfg).dequantize(), H)


def test_indefinite_hessian_gets_more_damping_and_says_so():
    W, H, _ = correlated_problem(16, 64, seed=2)
    H = H - 0.5 * torch.diag(H).mean() * torch.eye(64, dtype=H.dtype)   # eigenvalues below zero
    qt = gptq_quantize(W.float(), H.float(), GPTQ(group_size=32))
    assert torch.isfinite(qt.dequantize()).all()
    assert any("used damp" in w for w in qt.extras["warnings"])


def test_hopeless_hessian_falls_back_to_rtn_with_a_warning():
    W = torch.randn(16, 64)
    H = -torch.eye(64)
    qt = gptq_quantize(W, H, GPTQ(group_size=32))
    assert torch.equal(qt.codes, round_to_nearest(W, GPTQ(group_size=32)).codes)
    assert "RTN" in qt.extras["warnings"][0]


def test_all_zero_hessian_and_weight_stay_finite():
    qt = gptq_quantize(torch.zeros(8, 64), torch.zeros(64, 64), GPTQ(group_size=32, act_order=True))
    assert torch.equal(qt.dequantize(), torch.zeros(8, 64))


@pytest.mark.parametrize("stats", [None, LayerStats(64)], ids=["no-stats", "no-tokens"])
def test_layer_without_tokens_falls_back_to_rtn(stats):
    W = torch.randn(16, 64)
    qt = GPTQ(group_size=32).quantize_weight(W, stats)
    assert torch.equal(qt.codes, round_to_nearest(W, GPTQ(group_size=32)).codes)
    assert any("no calibration tokens" in w for w in qt.extras["warnings"])


def test_quantize_weight_uses_layer_stats():
    W, _, X = correlated_problem(32, 128, seed=9)
    W, X = W.float(), X.float()
    stats = LayerStats(128)
    stats.update(X[:300])
    stats.update(X[300:])
    qt = GPTQ(group_size=32).quantize_weight(W, stats)
    assert torch.equal(qt.codes, gptq_quantize(W, 2.0 / X.shape[0] * X.double().T @ X.double(), GPTQ(group_size=32)).codes)
    assert "warnings" not in qt.extras
    assert stats.output_error(W, qt.dequantize()) < stats.output_error(W, RTN(bits=4, group_size=32).quantize_weight(W).dequantize())


def test_bad_inputs_raise_lowbit_errors():
    with pytest.raises(LowbitError, match="does not divide"):
        gptq_quantize(torch.randn(4, 96), torch.eye(96), GPTQ(group_size=64))
    with pytest.raises(LowbitError, match="Hessian shape"):
        gptq_quantize(torch.randn(4, 64), torch.eye(32), GPTQ(group_size=32))
    with pytest.raises(LowbitError, match="bits"):
        GPTQ(bits=1)
    with pytest.raises(LowbitError, match="damp"):
        GPTQ(damp=-1)
    with pytest.raises(LowbitError, match="NaN"):
        gptq_quantize(torch.full((4, 64), math.nan), torch.eye(64), GPTQ(group_size=32))


# ---------------------------------------------------------------------------------------------------
# Names

@pytest.mark.parametrize("short, cfg", [
    ("gptq-int4-g128", GPTQ()),
    ("gptq-int4-g128", GPTQ(act_order=True, static_groups=True)),     # the default: act-order, static groups
    ("gptq-int4-g128-dynamic", GPTQ(static_groups=False)),
    ("gptq-int4-g128-noactorder-dynamic-noclip", GPTQ(act_order=False, static_groups=False, clip=False)),  # paper
    ("gptq-int4-g128-noactorder", GPTQ(act_order=False)),
    ("gptq-int3-g128", GPTQ(bits=3)),
    ("gptq-int4-g128-asym", GPTQ(symmetric=False)),
    ("gptq-int4-g128-damp0.001", GPTQ(damp=0.001)),
    ("gptq-int3-g128", GPTQ(bits=3, clip=True)),
    ("gptq-int4-g128-noclip", GPTQ(clip=False)),
    ("gptq-int8", GPTQ(bits=8, group_size=None)),
    ("gptq-int2-g64-mse", GPTQ(bits=2, group_size=64, mse=True)),
])
def test_short_names(short, cfg):
    assert parse_method(short) == cfg
    assert cfg.short_name() == short
    assert METHODS["gptq"] is GPTQ and GPTQ.required_stats == ("hessian",) and GPTQ.sequential
    assert GPTQ.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------------
# The bundled model, through the pipeline (true sequential: each Linear sees the quantised ones before)

def test_bundled_model_every_layer_below_rtn():
    """On every Linear of the bundled model, GPTQ's output error on its calibration inputs is below
    RTN's on the same inputs: lowbit's RTN and RTN on GPTQ's own grid."""
    import dataclasses

    import lowbit.api as api
    from lowbit.data import bundled_model_path

    try:
        bundled_model_path()
    except LowbitError:
        pytest.skip("the bundled model is not built (scripts/train_bundled_model.py)")
    model, tok = api.load_model()
    records = []

    @dataclasses.dataclass(frozen=True)
    class Recording(GPTQ):
        def quantize_weight(self, weight, stats=None):
            qt = super().quantize_weight(weight, stats)
            errors = [stats.output_error(weight, q.dequantize()) for q in
                      (qt, RTN(bits=self.bits, group_size=self.group_size).quantize_weight(weight), round_to_nearest(weight, self))]
            records.append(errors)
            return qt

    api.quantize(model, Recording(bits=4, group_size=128), tokenizer=tok, n_samples=32, progress=False)
    assert len(records) == 7 * model.config.num_hidden_layers
    for gptq_err, rtn_err, same_grid_err in records:
        assert gptq_err < same_grid_err and gptq_err < rtn_err
