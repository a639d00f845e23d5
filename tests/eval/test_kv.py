"""Perplexity read through the KV cache: the harness is exact for the fp cache, and the issue's bounds hold
for the quantised caches on the bundled model."""
import pytest
from lowbit.eval.kv import kv_perplexity
from lowbit.eval.perplexity import perplexity


CONTEXT = 256


@pytest.fixture(scope="module")
def bundled(one_thread):
    from lowbit import api
    from lowbit.data import bundled_text

    model, tok = api.load_model(None)
    ids = tok(bundled_text("eval")[:40000], return_tensors="pt").input_ids[0]
    return model, ids[:2 * CONTEXT]


_FP = {}


def fp_stepped(bundled):
    if not _FP:
        model, ids = bundled
        _FP["result"] = kv_perplexity(model, ids, None, context=CONTEXT, step=1, progress=False)
    return _FP["result"]


def test_fp_cache_fed_token_by_token_equals_one_forward_pass(bundled):
    model, ids = bundled
    one_pass = perplexity(model, ids, context=CONTEXT)
    stepped = fp_stepped(bundled)
    chunked = kv_perplexity(model, ids, None, context=CONTEXT, step=37, progress=False)
    assert stepped.n_scored == one_pass.n_scored == 2 * (CONTEXT - 1)
    assert stepped.perplexity == pytest.approx(one_pass.perplexity, rel=1e-5)
    assert chunked.perplexity == pytest.approx(one_pass.perplexity, rel=1e-5)


@pytest.mark.parametrize("scheme,bound", [("int8", 0.005), ("int4", 0.03), ("fp8", 0.03)])
def test_quantised_cache_perplexity_is_within_the_issue_bounds(bundled, scheme, bound):
    model, ids = bundled
    fp = fp_stepped(bundled).perplexity
    q = kv_perplexity(model, ids, scheme, context=CONTEXT, step=1, progress=False)
    assert q.perplexity != fp                          # the cache really was quantised
    assert abs(q.perplexity / fp - 1) <= bound
    assert "int" in q.protocol or "fp8" in q.protocol
