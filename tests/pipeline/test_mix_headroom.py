"""benchmarks/mix_headroom.py, the estimate of what finer allocation grains can gain: its Fisher probes
against the closed form of softmax regression, and its row-split and column-block arithmetic against
hand-computed values."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowbit.pipeline.sensitivity import LayerSensitivity

_spec = importlib.util.spec_from_file_location(
    "mix_headroom", Path(__file__).resolve().parents[2] / "benchmarks" / "mix_headroom.py")
headroom = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(headroom)


class SoftmaxRegression(torch.nn.Module):
    """logits = W x_t with fixed inputs x_t per token id."""

    def __init__(self, vocab=5, dim=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.emb.weight.data = torch.randn(vocab, dim, generator=g)
        self.emb.weight.requires_grad_(False)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight.data = torch.randn(vocab, dim, generator=g)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))

    @torch.no_grad()
    def fisher(self, ids):
        """Row r's Fisher, summed over positions t: p_r (1 - p_r) |x_t|^2."""
        x = self.emb(ids[0])
        p = torch.softmax(self.head(x), -1)
        return (p * (1 - p) * x.pow(2).sum(1, keepdim=True)).sum(0)


class LinearEncoder(SoftmaxRegression):
    """last_hidden_state = W x_t, embedded as e = m / |m|, m the mean of W x_t over tokens."""

    def forward(self, input_ids):
        return SimpleNamespace(last_hidden_state=self.head(self.emb(input_ids)))

    @torch.no_grad()
    def fisher(self, ids):
        """Row r's Fisher of v.e, v ~ N(0, I - e e^T): (1 - e_r^2) |x̄|^2 / |m|^2, x̄ the mean input."""
        xbar = self.emb(ids[0]).mean(0)
        m = self.head(xbar)
        return (1 - (m / m.norm()).pow(2)) * xbar.pow(2).sum() / m.pow(2).sum()


@pytest.mark.parametrize("model", [SoftmaxRegression(), LinearEncoder()], ids=["causal", "encoder"])
def test_row_fisher_is_the_closed_form(model):
    ids = torch.tensor([[0, 3, 4]])
    got = headroom.row_fisher(model, ids, ["head"], probes=30000)["head"]
    assert torch.allclose(got, model.fisher(ids).double() * 30000, rtol=0.05)   # 30000 draws: a few % of noise
    assert model.head.weight.grad is None and model.head.weight.requires_grad   # the model is left as it was


def test_top_share_and_split_options():
    assert headroom.top_share(torch.tensor([1.0, 3.0, 0.0, 4.0]), 0.5) == pytest.approx(7 / 8)
    assert headroom.top_share(torch.zeros(4), 0.25) == 0.25          # no importance: rows count alike
    layer = LayerSensitivity("l", 8, bytes=[100, 200], kl=[0.4, 0.1], proxy=[0, 0])
    options = headroom.split_options(layer, ["quip-3bit", "quip-4bit"], torch.tensor([4.0, 2, 1, 1, 0, 0, 0, 0]))
    # k/8 of the rows on quip-4bit: the top k hold 4/8, 6/8, 7/8, then all of the importance
    shares = [0.5, 0.75, 0.875, 1, 1, 1, 1]
    assert options == [(round(100 + 100 * k / 8), pytest.approx(s * 0.1 + (1 - s) * 0.4))
                       for k, s in zip(range(1, 8), shares)]
    assert headroom.split_options(layer, ["quip-3bit", "gptq-int4-g128"], torch.ones(8)) == []


def test_block_weights_are_the_ldl_diagonal():
    expected = torch.full((8,), 20.0, dtype=torch.float64)
    assert torch.allclose(headroom.block_weights(2.5 * torch.eye(64), damp=0.0), expected)
    # against Schur complements: D_k = H_kk - H_k,<k H_<k,<k^-1 H_<k,k of the rotated H (H = L D L^T, L lower)
    from lowbit.core.hadamard import random_signs, rht_both

    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64) * torch.logspace(0, 2, 64, dtype=torch.float64)
    h = x.T @ x
    su = random_signs(64, torch.Generator().manual_seed(0)).double()
    hr = rht_both(h, su, su)
    traces = []
    for k in range(8):
        s, e = 8 * k, 8 * k + 8
        d = hr[s:e, s:e] - (hr[s:e, :s] @ torch.linalg.solve(hr[:s, :s], hr[:s, s:e]) if s else 0)
        traces.append(float(d.trace()))
    assert torch.allclose(headroom.block_weights(h, damp=0.0), torch.tensor(traces, dtype=torch.float64), rtol=1e-8)


def test_block_split_weight_is_quip_at_either_end():
    """All blocks on one codebook is quip-4bit or quip-3bit; a split lands between them."""
    from lowbit.methods import parse_method
    from lowbit.methods.ldlq import proxy_loss
    from lowbit.methods.stats import LayerStats

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = (x.T @ x).double()
    stats = LayerStats(64, n_tokens=1, xtx=h)
    q4 = parse_method("quip-4bit").quantize_weight(w, stats).dequantize().double()
    assert torch.allclose(headroom.block_split_weight(w, h, torch.ones(8, dtype=torch.bool)), q4, atol=1e-5)
    q3 = parse_method("quip-3bit").quantize_weight(w, stats).dequantize().double()
    assert torch.allclose(headroom.block_split_weight(w, h, torch.zeros(8, dtype=torch.bool)), q3, atol=1e-5)
    half = headroom.block_split_weight(w, h, torch.arange(8) < 4)
    losses = [proxy_loss(w.double(), q, h) for q in (q4, half, q3)]
    assert losses[0] < losses[1] < losses[2]


def test_block_split_weight_rounds_the_chosen_blocks_finer():
    """With H = I the blocks do not interact: in the rotated basis the better blocks' error is the smaller."""
    from lowbit.core.hadamard import random_signs, rht_both

    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    better = torch.tensor([True, False] * 4)
    q = headroom.block_split_weight(w, torch.eye(64, dtype=torch.float64), better)
    gen = torch.Generator().manual_seed(0)
    su, sv = random_signs(64, gen).double(), random_signs(64, gen).double()
    err = rht_both(q - w.double(), su, sv).pow(2).reshape(64, 8, 8).sum((0, 2))
    assert err[better].max() < err[~better].min() and err[~better].mean() > 2 * err[better].mean()


def _one_linear(shares):
    """One 16-weight Linear measured at 3 bits (loss 0.4) and 4 bits (loss 0.1), its units' shares."""
    layer = LayerSensitivity("l", 16, bytes=[6, 8], kl=[0.4, 0.1], proxy=[0, 0])
    return [layer], ["quip-3bit", "quip-4bit"], {"l": torch.tensor(shares, dtype=torch.float64)}


def test_ladder_loss_puts_the_important_unit_on_more_bits():
    layers, names, shares = _one_linear([0.8, 0.2])
    assert headroom.ladder_loss(layers, names, shares, 3.5) == pytest.approx(0.8 * 0.1 + 0.2 * 0.4)
    assert headroom.ladder_loss(layers, names, shares, 4.0) == pytest.approx(0.1)
    assert headroom.ladder_loss(layers, names, shares, 3.0) == pytest.approx(0.4)


def test_ideal_loss_is_reverse_water_filling():
    """L_3 / L_4 = 4 (a = 2): equal shares at 3.5 bits lose L_4 2^(-2 (3.5 - 4)) = 2 L_4; shares 0.8 / 0.2
    differ by log2(4) / 2 = 1 bit in rate, 4 and 3 bits, and lose 0.8 L_4 + 0.2 x 4 L_4."""
    layers, names, shares = _one_linear([0.5, 0.5])
    assert headroom.ideal_loss(layers, names, shares, 3.5) == pytest.approx(0.2, rel=1e-6)
    layers, names, shares = _one_linear([0.8, 0.2])
    assert headroom.ideal_loss(layers, names, shares, 3.5) == pytest.approx(0.8 * 0.1 + 0.2 * 0.4, rel=1e-6)


def test_extrapolated_codebooks_continue_the_last_bit():
    layers, names, _ = _one_linear([1.0])
    (layer,), wider = headroom.extrapolated(layers, names)
    assert wider[2:] == ["quip-5bit*", "quip-6bit*"]
    assert layer.bytes == [6, 8, 10, 12] and layer.kl == pytest.approx([0.4, 0.1, 0.025, 0.00625])


def test_inside_each_holds_every_linear_to_its_own_size():
    """Two Linears, one with all the loss: a mix gives it the bits, a scheme held per Linear cannot; inside
    each Linear its units still move bits (shares 0.8 / 0.2 at 4 bits: nothing to move, 3 -> 4 bits)."""
    a = LayerSensitivity("a", 16, bytes=[6, 8], kl=[0.4, 0.1], proxy=[0, 0])
    b = LayerSensitivity("b", 16, bytes=[6, 8], kl=[0.004, 0.001], proxy=[0, 0])
    names = ["quip-3bit", "quip-4bit"]
    one = {"a": torch.ones(1, dtype=torch.float64), "b": torch.ones(1, dtype=torch.float64)}
    assert headroom.inside_each(headroom.ladder_loss, [a, b], names, one, "quip-3bit") == pytest.approx(0.404)
    assert headroom.ladder_loss([a, b], names, one, 3.5) == pytest.approx(0.1 + 0.004)
    assert headroom.inside_each(headroom.ladder_loss, [a, b], names, one, "quip-4bit") == pytest.approx(0.101)
    # ideal rates inside each Linear at 3 bits: shares 0.8 / 0.2 split 3.5 / 2.5 bits (a = 2)
    split = {"a": torch.tensor([0.8, 0.2], dtype=torch.float64), "b": torch.tensor([0.8, 0.2], dtype=torch.float64)}
    want = sum(l4 * (0.8 * 2 ** (-2 * (3.5 - 4)) + 0.2 * 2 ** (-2 * (2.5 - 4))) for l4 in (0.1, 0.001))
    assert headroom.inside_each(headroom.ideal_loss, [a, b], names, split, "quip-3bit") == pytest.approx(want, rel=1e-6)
