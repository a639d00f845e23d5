"""The E8P codebook of QuIP# against its definition: lattice membership, size, exact nearest search
(brute force over all 65,536 codewords), and its distortion on a Gaussian source against scalar 2-bit
grids and the rate-distortion bound."""
from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.e8 import (e81b_nearest, e81b_table, e8p_abs_grid, e8p_decode, e8p_nearest, e8p_table, in_e8,
                               to_int16)

LLOYD_MAX_2BIT = 0.1175   # the least MSE of any 4-level scalar quantiser of N(0, 1) (Max, 1960: 0.11748)


def test_in_e8_closed_form():
    pts = torch.tensor([[0.0] * 8, [1, 1, 0, 0, 0, 0, 0, 0], [0.5] * 8, [2, 0, 0, 0, 0, 0, 0, 0],
                        [1, 0, 0, 0, 0, 0, 0, 0], [0.5] * 7 + [-0.5], [0.5] * 7 + [1], [0.25] * 8])
    assert in_e8(pts).tolist() == [True, True, True, True, False, False, False, False]


def test_abs_grid_is_227_patterns_within_norm_10_and_29_of_norm_12():
    grid = e8p_abs_grid()
    norms = grid.square().sum(-1)
    assert grid.shape == (256, 8) and torch.unique(grid, dim=0).shape[0] == 256
    assert bool((norms[:227] <= 10).all()) and bool((norms[227:] == 12).all())
    assert bool((2 * grid % 2 == 1).all())                   # half-odd-integers: a coset of D8 + 1/2
    # every pattern of D8 + 1/2 within the ball: all |x| in {1/2, 3/2, 5/2}^8 with ||x||^2 <= 10
    half = torch.cartesian_prod(*[torch.tensor([0.5, 1.5, 2.5])] * 8)
    assert int((half.square().sum(-1) <= 10).sum()) == 227


def test_every_codeword_is_a_shifted_e8_point_and_all_65536_are_distinct():
    table = e8p_table()
    assert table.shape == (65536, 8) and torch.unique(table, dim=0).shape[0] == 65536
    assert bool(in_e8(table - 0.25).all())                    # E8 + 1/4 (= E8 - 1/4: (1/2)^8 is in E8)
    # the unshifted point lies in D8 + 1/2: half-integers with an even sum
    shift = torch.where(torch.arange(65536) & 1 == 1, 0.25, -0.25)[:, None]
    base = table - shift
    assert bool((2 * base % 2 == 1).all()) and bool((base.sum(-1) % 2 == 0).all())


def test_code_layout():
    # pattern 5, coordinates 0 and 3 negative (bits 1 and 4), shift +1/4; coordinate 7's sign by parity
    a = e8p_abs_grid()[5]
    code = (5 << 8) | (1 << 1) | (1 << 4) | 1
    neg = torch.zeros(8, dtype=torch.bool)
    neg[0] = neg[3] = True
    neg[7] = (int(a.sum()) % 2 == 1)                           # two negatives so far: one more if sum(a) odd
    expected = torch.where(neg, -a, a) + 0.25
    assert torch.equal(e8p_decode(torch.tensor([code])), expected[None])
    assert torch.equal(e8p_decode(to_int16(torch.tensor([code + 32768]))), e8p_table()[code + 32768][None])


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_nearest_equals_brute_force(scale):
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1)) * scale
    codes, values = e8p_nearest(x)
    assert codes.dtype == torch.int16 and torch.equal(e8p_decode(codes), values)
    brute = torch.cdist(x.double(), e8p_table().double()).square().min(1).values
    ours = (x.double() - values.double()).square().sum(-1)
    assert torch.allclose(ours, brute, atol=1e-9, rtol=1e-9)


def test_nearest_of_a_codeword_is_itself():
    codes = torch.randint(0, 65536, (500,), generator=torch.Generator().manual_seed(2))
    found, values = e8p_nearest(e8p_table()[codes])
    assert torch.equal(found.long() & 0xFFFF, codes) and torch.equal(values, e8p_table()[codes])


def test_gaussian_distortion_beats_every_scalar_2bit_grid():
    # 2 bits per dimension: E8P's MSE per dimension on N(0, 1) at its best scale, against Lloyd-Max (the best
    # 4-level scalar quantiser) and the rate-distortion bound D(R) = 2^(-2R) = 1/16 for R = 2
    x = torch.randn(10000, 8, generator=torch.Generator().manual_seed(3))
    mse = {s: float((e8p_nearest(x * s)[1] / s - x).square().mean()) for s in (0.95, 1.03, 1.1)}
    assert mse[1.03] < min(mse[0.95], mse[1.1])                                   # QuIP#'s opt_scale 1.03
    assert 2 ** -4 < mse[1.03] < 0.80 * LLOYD_MAX_2BIT                            # measured: 0.0912
    # Lloyd-Max itself, fitted on these samples, to confirm the constant
    levels = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    v = x.reshape(-1)
    for _ in range(50):
        idx = (v[:, None] - levels).abs().argmin(1)
        levels = torch.stack([v[idx == k].mean() for k in range(4)])
    lloyd = float((levels[(v[:, None] - levels).abs().argmin(1)] - v).square().mean())
    assert abs(lloyd - LLOYD_MAX_2BIT) < 0.003


def test_residual_codebook():
    table = e81b_table()
    norms = table.square().sum(-1)
    assert table.shape == (256, 8) and torch.unique(table, dim=0).shape[0] == 256 and bool(in_e8(table).all())
    assert int((norms == 0).sum()) == 1 and int((norms == 2).sum()) == 240 and int((norms == 4).sum()) == 15
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(4))
    codes, values = e81b_nearest(x)
    brute = torch.cdist(x, table).square().min(1).values
    assert torch.allclose((x - values).square().sum(-1), brute, atol=1e-5) and torch.equal(table[codes.long()], values)


def test_wrong_width_is_a_one_line_error():
    with pytest.raises(LowbitError, match="vectors of 8"):
        e8p_nearest(torch.zeros(3, 4))
