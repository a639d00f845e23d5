"""The straight-through estimator against its closed form (Bengio et al. 2013; LSQ, Esser et al. 2020)."""
import torch

from lowbit.train.ste import fake_quant_affine, fake_quant_grid, round_ste


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([-1.5, -0.4, 0.5, 1.49, 2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


def test_fake_quant_gradient_is_identity_inside_the_range_and_zero_outside():
    torch.manual_seed(0)
    x = (torch.randn(64, 32) * 3).requires_grad_()
    scale = torch.full((64, 1), 0.37)
    qmin, qmax, zero = -4, 3, 0.0
    y = fake_quant_affine(x, scale, zero, qmin, qmax)
    g = torch.randn_like(x)
    y.backward(g)
    v = x.detach() / scale
    inside = (v >= qmin) & (v <= qmax)
    assert inside.any() and (~inside).any()
    assert torch.equal(x.grad, torch.where(inside, g, torch.zeros_like(g)))   # exactly, not approximately
    # forward: the quantisation equation
    assert torch.equal(y.detach(), torch.clamp(torch.round(v), qmin, qmax) * scale)


def test_lsq_step_size_gradient_matches_the_paper():
    # LSQ eq. 3: d x_hat / d s = -v + round(v) inside, qmin or qmax outside (v = x / s)
    x = torch.tensor([[0.26, -0.9, 5.0, -7.0]])
    s = torch.tensor([[0.5]], requires_grad=True)
    fake_quant_affine(x, s, 0.0, -4, 3).sum().backward()
    v = x / 0.5
    expected = (torch.round(v[0, :2]) - v[0, :2]).sum() + 3 + (-4)
    assert torch.allclose(s.grad, expected.reshape(1, 1))


def test_asymmetric_zero_point_and_grid_rounder():
    x = torch.tensor([0.0, 0.1, 0.2, 2.0], requires_grad=True)
    y = fake_quant_affine(x, torch.tensor(0.1), torch.tensor(3.0), 0, 15)
    assert torch.allclose(y.detach(), torch.tensor([0.0, 0.1, 0.2, 1.2]))   # 2.0 clips at (15 - 3) * 0.1
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    z = torch.tensor([0.3, 0.7], requires_grad=True)
    fake_quant_grid(z, torch.round).sum().backward()
    assert torch.equal(z.grad, torch.ones(2))
