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
    assert " asked" not in calib.describe()
    # asking for more samples than there are documents gives every document, and says so
    every = calibration_samples(tiny_tokenizer, DOCS, n_samples=len(DOCS) + 7, seq_len=8)
    assert every.n_samples == len(DOCS)
    assert f"{len(DOCS)} samples" in every.describe() and f"of {len(DOCS) + 7} asked" in every.describe()


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


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama", "roberta"])
@pytest.mark.parametrize("how", ["ids", "texts"])
def test_calibration_longer_than_the_context_is_one_line_naming_both(arch, how, tiny_tokenizer):
    """--seq-len 64 on a model with a 32-position context: GPT-2/OPT raised torch.embedding's IndexError,
    Llama calibrated silently on positions it never saw. Right: a one-line error naming 64 and 32."""
    import transformers as t

    from tests.conftest import tiny_config

    config = tiny_config(arch)
    setattr(config, "n_positions" if arch == "gpt2" else "max_position_embeddings", 32 + (2 if arch == "roberta" else 0))
    model = (t.AutoModel if arch == "roberta" else t.AutoModelForCausalLM).from_config(config).eval()
    before = copy.deepcopy(model.state_dict())
    kwargs = ({"calibration": torch.zeros(2, 64, dtype=torch.long)} if how == "ids"
              else {"tokenizer": tiny_tokenizer, "seq_len": 64, "n_samples": 2})
    with pytest.raises(LowbitError) as e:
        api.quantize(model, "gptq-int4-g32", progress=False, **kwargs)
    message = str(e.value)
    assert "\n" not in message and "64 tokens" in message and "context of 32 positions" in message
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    # at the context length itself it runs
    api.quantize(model, "rtn-int4-g32", calibration=torch.ones(1, 32, dtype=torch.long), progress=False)


def test_calibration_leaves_the_tokenizer_as_it_was(tiny_tokenizer, tmp_path):
    """Samples mode truncates each document; the fast tokenizer kept that truncation on its backend, so
    the tokenizer.json saved with the quantised model cut every input at the calibration length (32)."""
    from lowbit.eval.embeddings import embed

    tok = copy.deepcopy(tiny_tokenizer)
    backend = tok.backend_tokenizer
    assert backend.truncation is None and backend.padding is None
    calibration_samples(tok, DOCS, n_samples=5, seq_len=8)
    embed(build_tiny_model("bert"), tok, DOCS[:2], max_length=8)
    assert backend.truncation is None and backend.padding is None
    backend.enable_truncation(100)      # a tokenizer that truncates on its own keeps its own setting
    calibration_samples(tok, DOCS, n_samples=5, seq_len=8)
    assert backend.truncation["max_length"] == 100 and backend.padding is None
    backend.no_truncation()
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["truncation"] is None
