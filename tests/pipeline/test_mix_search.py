"""benchmarks/mix_search.py's local search over per-Linear mixes, against brute force on small problems."""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "mix_search", Path(__file__).resolve().parents[2] / "benchmarks" / "mix_search.py")
mix_search = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mix_search)


class Loss:
    """A stand-in for the whole-model score: per-Linear errors err[n][j], summed, plus `coupling` times the
    product of the two largest (an interaction the additive allocator cannot see)."""

    def __init__(self, err, coupling):
        self.err, self.coupling, self.evals = err, coupling, 0

    def __call__(self, choice):
        self.evals += 1
        e = sorted((self.err[n][j] for n, j in choice.items()), reverse=True)
        return sum(e) + self.coupling * e[0] * e[1]


def brute_force(sizes, limit, loss):
    names = list(sizes)
    feasible = [dict(zip(names, c)) for c in itertools.product(*(range(len(sizes[n])) for n in names))
                if sum(sizes[n][j] for n, j in zip(names, c)) <= limit]
    return min(loss(c) for c in feasible)


@pytest.mark.parametrize("seed, coupling", [(0, 0.0), (1, 0.0), (2, 0.0), (3, 5.0), (4, 5.0)])
def test_search_stays_in_budget_never_worsens_and_reaches_the_additive_optimum(seed, coupling):
    g = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(5)]
    numel = {n: int(torch.randint(1, 5, (1,), generator=g)) * 64 for n in names}
    bits = (2, 3, 4, 8)
    sizes = {n: [numel[n] * b // 8 for b in bits] for n in names}
    scale = {n: float(torch.rand(1, generator=g)) + 0.05 for n in names}
    err = {n: [scale[n] * 4.0 ** -b for b in bits] for n in names}
    limit = sum(numel.values()) * 3.5 / 8
    start = {n: 1 for n in names}                                  # 3 bits everywhere: feasible, not optimal
    loss = Loss(err, coupling)
    best, history = mix_search.search(loss, start, sizes, int(limit), rounds=30, log=lambda s: None)
    assert sum(sizes[n][j] for n, j in best.items()) <= limit
    assert [h["loss"] for h in history] == sorted((h["loss"] for h in history), reverse=True)
    optimum = brute_force(sizes, limit, loss)
    if coupling == 0:       # additive: moves of one step reach the knapsack's optimum
        assert loss(best) == pytest.approx(optimum, rel=1e-9)
    else:
        assert loss(best) <= loss(start) and loss(best) <= 1.05 * optimum


def test_pairs_move_where_the_joint_knapsack_step_fails():
    """A loss that punishes moving more than two Linears at once from where the round began: the knapsack's
    joint step fails, an (up, down) pair still lowers the loss."""
    names = [f"l{i}" for i in range(5)]
    bits = (2, 3, 4, 8)
    sizes = {n: [64 * b // 8 for b in bits] for n in names}
    scale = dict(zip(names, (1.0, 0.5, 0.05, 0.02, 0.01)))
    err = {n: [scale[n] * 4.0 ** -b for b in bits] for n in names}
    origin = {}

    class Penalised:
        evals = 0

        def __call__(self, choice):
            self.evals += 1
            if not origin:
                origin.update(choice)
            moved = sum(choice[n] != origin[n] for n in names)
            return sum(err[n][j] for n, j in choice.items()) + (1.0 if moved > 2 else 0.0)

    start = {n: 1 for n in names}
    loss = Penalised()
    best, history = mix_search.search(loss, start, sizes, 5 * 64 * 3 // 8, rounds=1, log=lambda s: None)
    assert history[-1]["loss"] < history[0]["loss"]
    assert sum(best[n] != start[n] for n in names) == 2


def test_crossing_is_the_least_budget_reaching_the_target():
    from lowbit.pipeline.sensitivity import LayerSensitivity

    layers = [LayerSensitivity(n, 64, bytes=[24, 32], kl=[0.4, 0.1], proxy=[0, 0]) for n in ("a", "b")]
    # both at 4 bits: 0.2; one at 4 and one at 3: 0.5, which 3.5 bits per weight buys; both at 3: 0.8
    assert mix_search.crossing(layers, 0.2) == pytest.approx(4.0, abs=1e-6)
    assert mix_search.crossing(layers, 0.5) == pytest.approx(3.5, abs=1e-6)
    assert mix_search.crossing(layers, 0.8) == pytest.approx(3.0, abs=1e-6)
