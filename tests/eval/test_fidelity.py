import math

import pytest
import torch

from lowbit.eval.fidelity import build_reference, fidelity
from lowbit.eval.scoring import kl_per_position
from lowbit.eval.windows import split_windows
from tests.eval.helpers import direct_kl_top1, perturbed


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (400,), generator=torch.Generator().manual_seed(3))


def test_identical_model_has_zero_kl_and_full_agreement(llama, ids):
    ref = build_reference(llama, ids, context=64)
    f = fidelity(llama, ref)
    assert f.kl == pytest.approx(0, abs=1e-9) and f.top1 == 1.0 and f.n_positions == 6 * 63


def test_kl_and_top1_match_direct_computation(llama, ids):
    other = perturbed(llama)
    ref = build_reference(llama, ids, context=64, max_fidelity_tokens=3 * 63)
    f = fidelity(other, ref, batch_size=2)
    kl, top1 = direct_kl_top1(llama, other, split_windows(ids, 64).ids[:3])
    assert f.n_positions == 3 * 63
    assert f.kl == pytest.approx(kl, rel=1e-4) and f.kl > 1e-3
    assert f.top1 == pytest.approx(top1, abs=1e-12) and f.top1 < 1


def test_reference_perplexity_covers_all_windows_not_only_kept_ones(llama, ids):
    full = build_reference(llama, ids, context=64)
    short = build_reference(llama, ids, context=64, max_fidelity_tokens=63)
    assert short.logprobs.shape == (1, 63, 512)
    assert short.perplexity.perplexity == pytest.approx(full.perplexity.perplexity, rel=1e-6)


def test_kl_ignores_tokens_the_reference_rules_out():
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.25, 0.25, 0.5, 0.0]], dtype=torch.float64))
    assert float(kl_per_position(ref, q)) == pytest.approx(math.log(2), rel=1e-12)

