import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import round_mantissa, round_to_float
from lowbit.formats.scale import E8M0Format


def random_fp32(n=200000, seed=0):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    return x[torch.isfinite(x)]


def test_mantissa_rounding_to_7_bits_is_bf16_cast():
    x = random_fp32()
    assert torch.equal(round_mantissa(x, 7), x.to(torch.bfloat16).float())


def test_tf32_equals_fp16_rounding_inside_fp16_normal_range():
    x = random_fp32()
    x = x[(x.abs() >= 2**-14) & (x.abs() <= 60000)]
    assert torch.equal(round_to_float(x, "tf32"), x.to(torch.float16).float())


def test_tf32_keeps_fp32_range_and_ties_to_even():
    x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1e30, 1e-30, float("inf")])
    out = round_to_float(x, "tf32")
    assert out[0] == 1.0 and out[1] == 1 + 2**-9
    assert torch.isclose(out[2], torch.tensor(1e30), rtol=2**-11) and out[3] != 0 and out[4] == float("inf")


def test_unknown_precision():
    with pytest.raises(LowbitError):
        round_to_float(torch.ones(2), "fp12")


def test_e8m0_powers_of_two():
    f = E8M0Format()
    assert f.decode(torch.tensor([127, 128, 0])).tolist() == [1.0, 2.0, 2.0**-127]
    assert torch.isnan(f.decode(torch.tensor([255]))).all()
    assert f.ceil(torch.tensor([1.0, 1.1, 0.3, 4.0])).tolist() == [1.0, 2.0, 0.5, 4.0]
