"""AQLM (methods/aqlm.py) against closed forms: a codebook that holds W exactly gives error 0, the code
update is exact coordinate descent (matches brute force over one group), the objective never increases,
and it beats GPTQ at 2 bits on the same Hessian; its module against the dense equivalent."""
from __future__ import annotations

import pytest
import torch

from lowbit import AQLM, GPTQ, parse_method
from lowbit.errors import LowbitError
from lowbit.methods.aqlm import aqlm_quantize, codebook_gradient, decode, kmeans, objective, update_codes
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.ldlq import proxy_loss
from lowbit.nn import AQLMLinear
from tests.methods.helpers import check_module


def problem(n_out=32, n_in=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, n_in, generator=gen) @ (torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=gen))
    w = torch.randn(n_out, n_in, generator=gen) * 0.05
    return w, 2 / x.shape[0] * x.T @ x


def test_a_codebook_holding_w_gives_zero_error():
    # H = I and a codebook that contains every 8-vector of W (among other entries): one code sweep from any
    # start finds them, and the objective is exactly 0
    gen = torch.Generator().manual_seed(1)
    books = torch.randn(1, 256, 8, generator=gen)
    truth = torch.randint(0, 256, (16, 4, 1), generator=gen)
    w = decode(truth, books).reshape(16, 32)
    codes = torch.randint(0, 256, (16, 4, 1), generator=gen)
    update_codes(w, torch.eye(32), torch.ones(16), codes, books)
    assert torch.equal(codes, truth) and objective(w, torch.eye(32), torch.ones(16), codes, books) == 0


def test_code_update_is_exact_coordinate_descent():
    w, h = problem()
    gen = torch.Generator().manual_seed(0)
    books = torch.randn(2, 16, 8, generator=gen) * 0.5
    codes = torch.randint(0, 16, (32, 8, 2), generator=gen)
    scales = w.square().mean(1).sqrt()
    # brute force for group 0, codebook 0 given the rest: the k with least objective, per row
    errs = []
    for k in range(16):
        trial = codes.clone()
        trial[:, 0, 0] = k
        d = w - scales[:, None] * decode(trial, books).reshape(32, 64)
        errs.append(((d @ h) * d).sum(1))
    best = torch.stack(errs, 1).argmin(1)
    before = objective(w, h, scales, codes, books)
    first = codes.clone()
    update_codes(w, h, scales, first, books)
    assert torch.equal(first[:, 0, 0], best)
    assert objective(w, h, scales, first, books) < before


def test_objective_never_increases_and_beats_gptq_at_two_bits():
    w, h = problem(64, 128)
    q = aqlm_quantize(w, h, AQLM(rounds=3, adam_steps=20))
    history = q.extras["objective"]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:])) and history[-1] < 0.7 * history[0]
    gptq = gptq_quantize(w, h, GPTQ(bits=2, group_size=64)).dequantize()
    assert proxy_loss(w, q.dequantize(), h) < 0.8 * proxy_loss(w, gptq, h)
    # bits per weight from the stored tensors: 2 x 8-bit codes per 8 weights, fp16 codebooks and row scales
    assert q.bits_per_element == (2 * 8 * 64 * 16 + 16 * 2 * 256 * 8 + 16 * 64) / (64 * 128)
    check_module(q, AQLMLinear, 128, 64, slack_bits=0)


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 8, generator=gen) * 10
    x = centres.repeat(50, 1) + 0.01 * torch.randn(200, 8, generator=gen)
    found, assignment = kmeans(x, 4, torch.Generator().manual_seed(0))
    assert torch.allclose(found[assignment], x, atol=0.1)


def test_short_names_and_bad_input():
    assert parse_method("aqlm") == AQLM() and AQLM().short_name() == "aqlm"
    for name in ("aqlm-1x16", "aqlm-1x8-r2", "aqlm-steps10-seed3"):
        assert parse_method(name).short_name() == name
    with pytest.raises(LowbitError, match="2\\^8 or 2\\^16"):
        AQLM(code_bits=12)
    with pytest.raises(LowbitError, match="needs a Hessian"):
        AQLM().quantize_weight(torch.randn(8, 16), None)
    with pytest.raises(LowbitError, match="8 inputs at a time"):
        aqlm_quantize(torch.randn(8, 20), torch.eye(20), AQLM())


def test_codebook_gradient_is_autograd():
    w, h = problem()
    gen = torch.Generator().manual_seed(3)
    books = torch.randn(2, 16, 8, generator=gen).requires_grad_(True)
    codes = torch.randint(0, 16, (32, 8, 2), generator=gen)
    scales = torch.rand(32, generator=gen) + 0.5
    d = w - scales[:, None] * decode(codes, books).reshape(32, 64)
    ((d @ h) * d).sum().backward()
    assert torch.allclose(codebook_gradient(w, h, scales, codes, books.detach()), books.grad, rtol=1e-4, atol=1e-5)
