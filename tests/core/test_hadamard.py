"""The randomised Hadamard transform: Paley matrices are Hadamard, the fast transform is Sylvester's matrix,
and the transform is orthogonal (round trip, norms) for powers of two and 2^k x Paley orders."""
from __future__ import annotations

import pytest
import torch

from lowbit.core.hadamard import (fwht, hadamard, hadamard_factor, paley, random_signs, rht, rht_both,
                                  rht_both_inverse, rht_inverse)
from lowbit.errors import LowbitError


@pytest.mark.parametrize("m", [4, 8, 12, 20, 24, 32, 44, 48, 60])
def test_paley_is_hadamard(m):
    h = paley(m)
    assert bool((h.abs() == 1).all()) and torch.equal(h @ h.T, m * torch.eye(m))


def test_fwht_is_sylvester():
    h = torch.ones(1, 1)
    for _ in range(5):
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    x = torch.randn(3, 32)
    assert torch.allclose(fwht(x), x @ h.T, atol=1e-5)


@pytest.mark.parametrize("n", [8, 256, 384, 768, 1536, 320, 12])
def test_transform_is_orthogonal(n):
    signs = random_signs(n, torch.Generator().manual_seed(n)).double()
    m = rht(torch.eye(n, dtype=torch.float64), signs)
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(rht_inverse(rht(x, signs), signs), x, atol=1e-12)
    assert torch.allclose(hadamard(hadamard(x), transpose=True), x, atol=1e-12)


def test_two_sided_transform_round_trips_and_keeps_quadratic_forms():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, dtype=torch.float64)
    su, sv = random_signs(64, gen).double(), random_signs(24, gen).double()
    wr = rht_both(w, su, sv)
    assert torch.allclose(rht_both_inverse(wr, su, sv), w, atol=1e-12)
    x = torch.randn(100, 64, dtype=torch.float64)
    h = x.T @ x
    hr = rht_both(h, su, su)
    # tr(W H W^T) is invariant: the transform is a change of basis on both sides
    assert torch.allclose(torch.trace(wr @ hr @ wr.T), torch.trace(w @ h @ w.T), rtol=1e-10)


@pytest.mark.parametrize("n", [56, 6, 36])
def test_unsupported_orders_are_a_one_line_error(n):
    with pytest.raises(LowbitError, match="no Hadamard matrix of order") as e:
        hadamard_factor(n)
    assert "\n" not in str(e.value)
