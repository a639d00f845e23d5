"""BitNet b1.58's int8 x ternary matmul: the multiplication-free reference equals the float matmul of the same
ternary values exactly; the int8 per-token activation quantiser's bounds; the layer's closed form."""
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.ternary import (bitlinear, quantize_tokens_int8, ternary_matmul, ternary_matmul_reference)


def _codes(n, k, seed=0):
    return torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed)).to(torch.int8)


@pytest.mark.parametrize("t, n, k", [(1, 1, 1), (5, 7, 33), (16, 96, 768)])
def test_addition_only_reference_equals_the_float_matmul_exactly(t, n, k):
    g = torch.Generator().manual_seed(t)
    xq = torch.randint(-128, 128, (t, k), generator=g).to(torch.int8)
    xq[0, :] = 127                                                # the extremes of int8 and their sums
    codes = _codes(n, k, t)
    ref = ternary_matmul_reference(xq, codes)
    assert ref.dtype == torch.int64
    assert torch.equal(ref.float(), ternary_matmul(xq, codes))
    assert torch.equal(ref, xq.long() @ codes.long().T)          # integer matmul (multiplications) agrees


def test_reference_refuses_float_activations_and_bad_shapes():
    with pytest.raises(LowbitError, match="integer"):
        ternary_matmul_reference(torch.randn(2, 4), _codes(3, 4))
    with pytest.raises(LowbitError, match="xq"):
        ternary_matmul_reference(torch.zeros(2, 5, dtype=torch.int8), _codes(3, 4))


def test_int8_tokens_absmax_bounds():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 3, 6).unsqueeze(1)
    x[2] = 0
    xq, s = quantize_tokens_int8(x)
    assert xq.dtype == torch.int8 and s.shape == (6, 1)
    live = torch.arange(6) != 2
    assert torch.equal(xq[live].abs().amax(-1), torch.full((5,), 127, dtype=torch.int8))   # absmax -> 127
    assert ((xq.float() / s - x).abs() <= 0.5 / s + 1e-6 * x.abs()).all()                  # half a step
    assert torch.equal(xq[2], torch.zeros(64, dtype=torch.int8))


def test_bitlinear_is_the_closed_form():
    x = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(4))
    codes, gamma, bias = _codes(10, 48), torch.tensor(0.25, dtype=torch.float16), torch.randn(10)
    y = bitlinear(x, codes, gamma, bias)
    s = 127 / x.abs().amax(-1, keepdim=True)
    xq = torch.round(x * s).clamp(-128, 127)
    expected = (xq @ codes.float().T) * (0.25 / s) + bias
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    ref = bitlinear(x, codes, gamma, bias, matmul=ternary_matmul_reference)
    assert torch.equal(ref, y)
