import pytest
import torch

from lowbit.eval.evaluate import evaluate
from lowbit.eval.fidelity import build_reference
from lowbit.eval.windows import split_windows
from tests.eval.helpers import direct_kl_top1, perturbed


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (400,), generator=torch.Generator().manual_seed(3))


def test_evaluate_with_reference_reports_delta_and_kl(llama, ids):
    other = perturbed(llama)
    ref = build_reference(llama, ids, context=64, max_fidelity_tokens=2 * 63)
    row = evaluate(other, reference=ref, speed=False)
    kl, top1 = direct_kl_top1(llama, other, split_windows(ids, 64).ids[:2])
    assert row["kl"] == pytest.approx(kl, rel=1e-4) and row["top1"] == pytest.approx(top1)
    assert row["delta_ppl"] == pytest.approx(row["perplexity"] - ref.perplexity.perplexity, abs=1e-12)
    assert row["n_scored"] == 6 * 63


def test_documents_are_encoded_one_by_one_with_special_tokens(tiny_tokenizer):
    from lowbit.data import DOCUMENT_SEPARATOR
    from lowbit.eval.evaluate import tokenize

    docs = ["def f(x):\n    return x", "Return the sum of two numbers."]
    ids = tokenize(tiny_tokenizer, DOCUMENT_SEPARATOR.join(docs) + "\n")
    expected = tiny_tokenizer(docs[0])["input_ids"] + tiny_tokenizer(docs[1] + "\n")["input_ids"]
    assert ids.tolist() == expected and tokenize(tiny_tokenizer, DOCUMENT_SEPARATOR.join(docs), 3).numel() == 3
