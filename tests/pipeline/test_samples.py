"""Calibration by sample: each document its own sequence, batched with padding that no statistic sees."""
import copy
import json
from dataclasses import dataclass

import pytest
import torch

from lowbit import api
from lowbit.core import QuantSpec
from lowbit.errors import LowbitError
from lowbit.methods.base import MethodConfig
from lowbit.methods.rtn import rtn_quantize
from lowbit.pipeline.samples import CalibrationSet, calibration_samples, encode_sample, resolve_mode
from tests.conftest import build_tiny_model

DOCS = ["a short one.", "a somewhat longer document, with a clause or two, and then some more words to pad it out.",
        "medium length text here, five or six more words.", "x", "another document of middling size for the set."]


@dataclass(frozen=True)
class RecordingRTN(MethodConfig):
    """RTN that records the statistics the pipeline hands each layer (test-only)."""
    name = "recording-rtn-samples"
    required_stats = ("hessian",)
    log: dict = None

    def quantize_weight(self, weight, stats, name=None):
        self.log.setdefault("stats", []).append(stats)
        return rtn_quantize(weight, QuantSpec("int8", "channel"))


def recorded_stats(arch, calibration, batch_size):
    log = {}
    model = build_tiny_model(arch)
    api.quantize(model, RecordingRTN(log=log), calibration=calibration, batch_size=batch_size, progress=False)
    return log["stats"]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_padding_never_reaches_a_statistic(arch, tiny_tokenizer):
    """Samples of different lengths in padded batches give every Linear the statistics of the unpadded
    samples alone (each run as a batch of one, no padding at all)."""
    calib = calibration_samples(tiny_tokenizer, DOCS, n_samples=5, seq_len=32)
    lengths = [int(s.numel()) for s in calib.ids]
    assert len(set(lengths)) > 2
    batched = calib.batches(4)
    assert batched[0][1] is not None and int((batched[0][1] == 0).sum()) > 0   # there is padding to exclude
    padded, alone = recorded_stats(arch, calib, 4), recorded_stats(arch, calib, 1)
    assert len(padded) == len(alone)
    # every block Linear saw exactly the real tokens (BERT's pooler reads one token per sample)
    assert sum(p.n_tokens == sum(lengths) for p in padded) >= 8
    for p, a in zip(padded, alone):
        assert p.n_tokens == a.n_tokens
        torch.testing.assert_close(p.hessian(), a.hessian(), rtol=1e-4, atol=1e-6 * float(a.hessian().abs().max()))
        torch.testing.assert_close(p.act_absmax(), a.act_absmax(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.act_absmean(), a.act_absmean(), rtol=1e-4, atol=1e-6)


def test_awq_block_error_ignores_padding(tiny_tokenizer):
    """AWQ's scale search judges the block's outputs at real tokens only: padded batches choose the
    scales a batch of one does."""
    from lowbit.methods import AWQ
    from lowbit.pipeline.scaling import prepare_model

    calib = calibration_samples(tiny_tokenizer, DOCS, n_samples=5, seq_len=32)
    base = build_tiny_model("llama")
    config = AWQ(group_size=32, n_grid=5, search_batches=None)   # every sample in both runs
    a = prepare_model(copy.deepcopy(base), config, calib, batch_size=4)
    b = prepare_model(copy.deepcopy(base), config, calib, batch_size=1)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_each_sample_is_one_document_with_special_tokens(tiny_tokenizer):
    calib = calibration_samples(tiny_tokenizer, DOCS, n_samples=3, seq_len=8, seed=1)
    assert calib.mode == "samples" and calib.n_samples == 3
    bos = tiny_tokenizer.bos_token_id
    for s in calib.ids:
        assert s.numel() <= 8
    # the tokenizer's own special tokens: what `tokenizer(doc)` gives, truncated
    assert torch.equal(encode_sample(tiny_tokenizer, DOCS[1], 8), torch.tensor(tiny_tokenizer(DOCS[1])["input_ids"][:8]))
    assert calib.n_tokens == sum(int(s.numel()) for s in calib.ids)
    assert "3 samples" in calib.describe() and f"{calib.n_tokens:,} tokens" in calib.describe()
    assert calibration_samples(tiny_tokenizer, DOCS, n_samples=3, seq_len=8, seed=1).ids[0].tolist() == calib.ids[0].tolist()
    assert bos is not None


def test_bert_tokenizer_wraps_each_sample_in_cls_sep(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    calib = calibration_samples(fast, ["a b c", "c a"], n_samples=2, seq_len=16)
    assert [s.tolist() for s in calib.ids] == [[2, 4, 5, 6, 3], [2, 6, 4, 3]]
    ids, mask = calib.batches(2)[0]
    assert ids.tolist() == [[2, 4, 5, 6, 3], [2, 6, 4, 3, 0]] and mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0]]


def test_chat_rows_go_through_the_chat_template(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rows = [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]},
            {"text": "plain row"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert resolve_mode("auto", True, path) == "samples" and resolve_mode("auto", True, None) == "windows"
    calib = calibration_samples(tok, path, n_samples=2, seq_len=64)
    rendered = tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert any(s.tolist() == tok(rendered, add_special_tokens=False)["input_ids"] for s in calib.ids)
    with pytest.raises(LowbitError, match="chat template"):
        calibration_samples(tiny_tokenizer, path, n_samples=2, seq_len=64)


def test_auto_mode_is_samples_for_encoders_and_windows_for_decoders(tiny_tokenizer):
    assert resolve_mode("auto", False) == "samples"
    assert resolve_mode("windows", False) == "windows"
    with pytest.raises(LowbitError, match="calibration mode"):
        resolve_mode("stream", True)
    bert, llama = build_tiny_model("bert"), build_tiny_model("llama")
    api.quantize(bert, "rtn-int8", tokenizer=tiny_tokenizer, calibration=DOCS, n_samples=4, seq_len=32, progress=False)
    assert "samples" in bert.lowbit_calibration
    api.quantize(llama, "rtn-int8", tokenizer=tiny_tokenizer, n_samples=2, seq_len=32, progress=False)
    assert bert.lowbit_report[0].n_tokens < 4 * 32 and "2 windows, 64 tokens" in llama.lowbit_calibration


def test_windows_stay_a_calibration_set_without_masks():
    ids = torch.arange(40).reshape(4, 10)
    calib = CalibrationSet.of(ids)
    assert calib.mode == "windows" and calib.n_tokens == 40
    assert all(mask is None for _, mask in calib.batches(3))
