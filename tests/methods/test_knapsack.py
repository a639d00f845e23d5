"""The multiple-choice knapsack against brute force (every combination), and its refusals."""
import itertools
import random

import pytest

from lowbit.errors import LowbitError
from lowbit.methods.knapsack import allocate


def brute_force(sizes, losses, budget):
    best = None
    for picks in itertools.product(*[range(len(r)) for r in sizes]):
        size = sum(sizes[i][j] for i, j in enumerate(picks))
        loss = sum(losses[i][j] for i, j in enumerate(picks))
        if size <= budget and (best is None or loss < best[0] - 1e-12):
            best = (loss, size)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_optimum_equals_brute_force(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 6), rng.randint(1, 4)
    unit = rng.choice([1, 8, 1024])
    sizes = [[unit * rng.randint(1, 40) for _ in range(k)] for _ in range(n)]
    losses = [[rng.random() for _ in range(k)] for _ in range(n)]
    budget = rng.randint(sum(min(r) for r in sizes), sum(max(r) for r in sizes))
    got = allocate(sizes, losses, budget)
    loss, _ = brute_force(sizes, losses, budget)
    assert got.size <= budget and got.unit % unit == 0
    assert got.loss == pytest.approx(loss, abs=1e-12)
    assert got.loss == pytest.approx(sum(losses[i][j] for i, j in enumerate(got.choice)))


def test_a_coarse_unit_never_exceeds_the_budget(monkeypatch):
    import lowbit.methods.knapsack as ks

    monkeypatch.setattr(ks, "MAX_CELLS", 200)
    rng = random.Random(1)
    sizes = [[rng.randint(1, 10 ** 6) for _ in range(3)] for _ in range(5)]
    losses = [[rng.random() for _ in range(3)] for _ in range(5)]
    budget = sum(sorted(r)[1] for r in sizes)
    got = allocate(sizes, losses, budget)
    assert got.unit > 1 and got.size <= budget


def test_refusals():
    with pytest.raises(LowbitError, match="below the smallest"):
        allocate([[5, 6], [7]], [[0, 0], [0]], 11)
    with pytest.raises(LowbitError, match="finite"):
        allocate([[1]], [[float("nan")]], 3)
    with pytest.raises(LowbitError, match="non-negative integer"):
        allocate([[1]], [[0.0]], -1)
