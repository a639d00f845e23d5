import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.eval.perplexity import perplexity


class ConstantLogits(nn.Module):
    """A 'language model' whose next-token distribution is uniform whatever the input."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.full((*input_ids.shape, self.vocab), 3.7))


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    ids = torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(0))
    r = perplexity(ConstantLogits(1000), ids, context=128)
    # exact up to float32 rounding of the log-softmax (log-probs are float32: relative error ~1e-7)
    assert r.perplexity == pytest.approx(1000, rel=1e-6)
    assert r.nll == pytest.approx(math.log(1000), rel=1e-7) and r.n_scored == 7 * 127


def test_perplexity_matches_direct_cross_entropy_over_two_windows(llama):
    context = 40
    ids = torch.randint(0, 512, (2 * context + 7,), generator=torch.Generator().manual_seed(1))
    r = perplexity(llama, ids, context=context, batch_size=1)
    with torch.no_grad():
        nll = sum(F.cross_entropy(llama(w[None]).logits[0, :-1].double(), w[1:], reduction="sum")
                  for w in (ids[:context], ids[context:2 * context]))
    assert r.n_scored == 2 * (context - 1) and r.n_windows == 2
    assert r.perplexity == pytest.approx(math.exp(float(nll) / (2 * (context - 1))), rel=1e-5)


def test_batching_windows_does_not_change_perplexity(llama):
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(2))
    one, many = perplexity(llama, ids, 32, batch_size=1), perplexity(llama, ids, 32, batch_size=4)
    assert one.perplexity == pytest.approx(many.perplexity, rel=1e-5)
