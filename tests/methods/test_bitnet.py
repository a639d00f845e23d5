"""BitNet b1.58's absmean ternary quantiser against the paper's closed form, and its registration."""
import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods import BitNet, method_from_dict, parse_method
from lowbit.methods.bitnet import absmean_ternary
from lowbit.weights.ternary import TernaryWeight


def test_absmean_scale_and_codes_are_the_papers_formula():
    """gamma = mean |W| (stored as float16), W~ = RoundClip(W / gamma, -1, 1): computed here in numpy."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    q = absmean_ternary(w)
    gamma = np.float16(np.abs(w.numpy()).mean())
    codes = np.clip(np.rint(w.numpy() / np.float32(gamma)), -1, 1)
    assert isinstance(q, TernaryWeight) and q.scale.item() == float(gamma)
    assert np.array_equal(q.codes().numpy(), codes.astype(np.int8))
    assert torch.equal(q.dequantize(), torch.from_numpy(codes.astype(np.float32) * np.float32(gamma)))
    share = (q.codes() == 0).float().mean().item()
    assert 0.3 < share < 0.45     # Gaussian weights: |w| < gamma / 2 = 0.4 sigma for about 31% of them ... 40%


def test_zero_weight_keeps_a_positive_scale():
    q = absmean_ternary(torch.zeros(4, 8))
    assert q.scale.item() > 0 and torch.equal(q.dequantize(), torch.zeros(4, 8))


def test_method_names_and_dicts_round_trip():
    assert parse_method("bitnet") == BitNet() and parse_method("bitnet-2bit") == BitNet(packing="2bit")
    assert BitNet(packing="2bit").short_name() == "bitnet-2bit"
    assert method_from_dict(BitNet(packing="2bit").to_dict()) == BitNet(packing="2bit")
    q = BitNet(packing="2bit").quantize_weight(torch.randn(8, 16))
    assert q.packing == "2bit" and q.bits_per_element == pytest.approx(2 + 16 / 128)
    planned = BitNet().planned_weight(torch.Size([256, 768]), None)
    assert planned.nbytes == -(-256 * 768 // 5) + 2


@pytest.mark.parametrize("bad, match", [(torch.randn(8), "2-D"), (torch.full((2, 2), float("nan")), "NaN")])
def test_bad_weights_are_refused(bad, match):
    with pytest.raises(LowbitError, match=match):
        absmean_ternary(bad)
    with pytest.raises(LowbitError, match="packing"):
        BitNet(packing="ternary")
