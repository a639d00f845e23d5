"""FP8/FP6/FP4 (and FP16/BF16 through the same class) against torch's dtypes and closed forms."""
import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import get_format

TORCH_TWINS = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
               "fp16": torch.float16, "bf16": torch.bfloat16}
VIEW_INT = {8: torch.uint8, 16: torch.int16}


def torch_decode_all(dtype, bits):
    codes = torch.arange(1 << bits, dtype=torch.int64)
    raw = codes.to(torch.uint8) if bits == 8 else torch.where(codes >= 1 << 15, codes - (1 << 16), codes).to(torch.int16)
    return raw.view(dtype).float()


@pytest.mark.parametrize("name", list(TORCH_TWINS))
def test_every_code_decodes_like_torch(name):
    fmt = get_format(name)
    ours, theirs = fmt.table, torch_decode_all(TORCH_TWINS[name], fmt.bits)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    keep = ~torch.isnan(theirs)
    assert torch.equal(ours[keep], theirs[keep])
    assert torch.equal(torch.signbit(ours[keep]), torch.signbit(theirs[keep]))


def random_in_range(max_value, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    # log-uniform magnitudes cover subnormals, normals and the top binade alike
    mags = torch.exp(torch.empty(n).uniform_(math.log(1e-6), math.log(max_value), generator=g))
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = (mags * signs).clamp(-max_value, max_value)
    return torch.cat([x, torch.tensor([0.0, -0.0, max_value, -max_value])])


@pytest.mark.parametrize("name", list(TORCH_TWINS))
def test_encode_bit_identical_to_torch_cast(name):
    fmt = get_format(name)
    x = random_in_range(fmt.max_value)
    dtype = TORCH_TWINS[name]
    theirs = x.to(dtype).view(VIEW_INT[fmt.bits]).to(torch.int64) & ((1 << fmt.bits) - 1)
    assert torch.equal(fmt.encode(x).to(torch.int64), theirs)


@pytest.mark.parametrize("name", list(TORCH_TWINS))
def test_ties_round_to_even_like_torch(name):
    fmt = get_format(name)
    v = fmt.values()
    v = v[v >= 0]
    mids = (v[1:].double() + v[:-1].double()) / 2  # exact midpoints between neighbours
    mids = mids[mids.float().double() == mids].float()
    theirs = mids.to(TORCH_TWINS[name]).float()
    assert torch.equal(fmt.round(mids), theirs)


def test_nan_encodes_to_torch_nan_code():
    assert get_format("fp8_e4m3").encode(torch.tensor([math.nan])).item() == 0x7F
    assert math.isnan(get_format("fp8_e5m2").decode(get_format("fp8_e5m2").encode(torch.tensor([math.nan]))).item())


def test_fp8_limits():
    e4m3, e5m2 = get_format("fp8_e4m3"), get_format("fp8_e5m2")
    assert e4m3.max_value == 448 and e5m2.max_value == 57344
    assert e4m3.values()[e4m3.values() > 0].min().item() == 2**-9
    assert e5m2.values()[e5m2.values() > 0].min().item() == 2**-16


@pytest.mark.parametrize("name,big,expected", [("fp8_e4m3", 1e6, 448.0), ("fp8_e5m2", 1e9, 57344.0),
                                               ("fp4_e2m1", 100.0, 6.0), ("fp6_e3m2", 1e3, 28.0), ("fp6_e2m3", 1e3, 7.5)])
def test_saturates_at_largest_finite(name, big, expected):
    fmt = get_format(name)
    out = fmt.round(torch.tensor([big, -big, math.inf, -math.inf]))
    assert out.tolist() == [expected, -expected, expected, -expected]


def test_fp4_e2m1_closed_form():
    fmt = get_format("fp4_e2m1")
    assert fmt.values().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    # code = s<<3 | e<<1 | m
    assert fmt.decode(torch.tensor([0b0111, 0b1010, 0b0001])).tolist() == [6.0, -1.0, 0.5]
    # ties to even mantissa: 2.5 -> 2, 3.5 -> 4, 5 -> 4, 0.25 -> 0, 0.75 -> 1
    assert fmt.round(torch.tensor([2.5, 3.5, 5.0, 0.25, 0.75])).tolist() == [2.0, 4.0, 4.0, 0.0, 1.0]


@pytest.mark.parametrize("name,e,m,bias", [("fp6_e3m2", 3, 2, 3), ("fp6_e2m3", 2, 3, 1)])
def test_fp6_tables_closed_form(name, e, m, bias):
    fmt = get_format(name)
    expected = set()
    for ef in range(1 << e):
        for mf in range(1 << m):
            mag = (mf / 2**m) * 2 ** (1 - bias) if ef == 0 else (1 + mf / 2**m) * 2 ** (ef - bias)
            expected |= {mag, -mag}
    assert sorted(expected) == fmt.values().tolist()


def test_round_trip_of_every_code():
    for name in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"):
        fmt = get_format(name)
        codes = torch.arange(1 << fmt.bits)
        vals = fmt.decode(codes)
        ok = torch.isfinite(vals)
        assert torch.equal(fmt.encode(vals[ok]).long(), codes[ok]), name


def test_fp4_rejects_nan():
    with pytest.raises(LowbitError, match="NaN"):
        get_format("fp4_e2m1").encode(torch.tensor([1.0, math.nan]))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_to_float8_rounds_like_our_grid_and_saturates(name):
    from lowbit.formats.minifloat import to_float8

    fmt = get_format(name)
    top = fmt.max_value
    # in range, beyond it, and the midpoint between max and the next binade step (torch's cast gives inf there)
    x = torch.cat([random_in_range(top, n=5000, seed=3), torch.tensor([top * 1.06, -top * 1.2, 1e30, -1e30])])
    ours = to_float8(x, name).float()
    assert torch.equal(ours, fmt.round(x))  # FloatFormat.round: float64 arithmetic, saturating
    assert torch.equal(ours[-4:], torch.tensor([top, -top, top, -top]))


def test_to_float8_keeps_non_finite_values_non_finite():
    from lowbit.formats.minifloat import to_float8

    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0])
    for name in ("fp8_e5m2", "fp8_e4m3"):   # not saturated: an overflow must stay visible to a loss scaler
        assert torch.isnan(to_float8(x, name).float()).tolist() == [True, True, True, False]
    with pytest.raises(LowbitError, match="no torch float8"):
        to_float8(x, "fp6_e3m2")
