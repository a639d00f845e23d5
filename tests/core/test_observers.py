import pytest
import torch

from lowbit.core import KL, Percentile, QuantSpec, quantize
from lowbit.errors import LowbitError


def student_t(n=100_000, df=3.0, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(df).sample((1, n))


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_mse_observer_beats_minmax_on_heavy_tails(fmt):
    x = student_t()
    spec = QuantSpec(fmt, "tensor", scale_dtype="fp32")
    err = {obs: float((x - quantize(x, spec, obs).dequantize()).pow(2).mean()) for obs in ("minmax", "mse")}
    assert err["mse"] < 0.9 * err["minmax"], err


def test_mse_observer_never_worse_than_minmax_per_group():
    x = student_t(4096).reshape(32, 128)
    spec = QuantSpec("int4", "group", 32, scale_dtype="fp32")
    e_mm = (x - quantize(x, spec, "minmax").dequantize()).pow(2).reshape(-1, 32).sum(1)
    e_mse = (x - quantize(x, spec, "mse").dequantize()).pow(2).reshape(-1, 32).sum(1)
    assert torch.all(e_mse <= e_mm * (1 + 1e-6))  # ratio 1.0 is in the grid


def test_percentile_clips_at_the_quantile():
    x = student_t()
    q = quantize(x, QuantSpec("int8", "tensor", scale_dtype="fp32"), Percentile(99.0))
    expected = torch.quantile(x.abs()[0, :50000], 0.99)  # independent estimate on half the data
    assert abs(float(q.scale) * 127 / float(expected) - 1) < 0.1


def test_kl_clips_heavy_tails_but_not_uniform_data():
    heavy = student_t()
    q = quantize(heavy, QuantSpec("int8", "tensor", scale_dtype="fp32"), KL())
    assert float(q.scale) * 127 < 0.5 * float(heavy.abs().max())
    uniform = torch.rand(1, 100_000) * 2 - 1
    qu = quantize(uniform, QuantSpec("int8", "tensor", scale_dtype="fp32"), KL())
    assert float(qu.scale) * 127 > 0.9


def test_kl_is_symmetric_only():
    with pytest.raises(LowbitError, match="symmetric"):
        quantize(torch.randn(4, 8), QuantSpec("uint8", symmetric=False), KL())


def test_unknown_observer():
    with pytest.raises(LowbitError, match="unknown observer"):
        quantize(torch.randn(4, 8), QuantSpec("int8"), "entropy")


def test_percentile_range_checked():
    with pytest.raises(LowbitError):
        Percentile(30)
