"""Exporters copy what they hold, re-round only what they must when asked, and refuse the rest clearly."""
from __future__ import annotations

import copy

import pytest

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.io import get_exporter, get_importer, quantized_weights
from lowbit.methods import Recipe
from tests.io.test_conformance import small_llama


@pytest.fixture(scope="module")
def base():
    return small_llama()


def quantised(base, recipe, tok):
    return api.quantize(copy.deepcopy(base), recipe, tokenizer=tok, n_samples=2, seq_len=32, progress=False)


def test_bnb_requantize_rounds_other_weights_to_nf4(base, tiny_tokenizer, tmp_path):
    model = quantised(base, "rtn-int4-g128", tiny_tokenizer)
    with pytest.raises(LowbitError, match="--requantize"):
        get_exporter("bnb").export(model, tmp_path / "a", tokenizer=tiny_tokenizer)
    out = api.export(model, tmp_path / "b", format="bnb", tokenizer=tiny_tokenizer, requantize=True)
    back = quantized_weights(get_importer("bnb")(out)[0])
    assert back and all(type(w).__name__ == "Quantized4bit" and w.quant_type == "nf4" for w in back.values())


def test_gguf_requantize_through_the_api_rounds_only_mismatching_blocks(base, tiny_tokenizer, tmp_path):
    from gguf import GGUFReader

    model = quantised(base, "q4_k_m", tiny_tokenizer)
    with pytest.raises(LowbitError, match="--requantize"):
        api.export(model, tmp_path / "a.gguf", format="gguf", tokenizer=tiny_tokenizer, type="Q8_0")
    api.export(model, tmp_path / "b.gguf", format="gguf", tokenizer=tiny_tokenizer, type="Q8_0", requantize=True)
    assert {t.tensor_type.name for t in GGUFReader(tmp_path / "b.gguf").tensors} <= {"Q8_0", "F32"}
    # the same file type with requantize: every held block is copied, byte for byte
    api.export(model, tmp_path / "c.gguf", format="gguf", tokenizer=tiny_tokenizer, type="Q4_K_M", requantize=True)
    api.export(model, tmp_path / "d.gguf", format="gguf", tokenizer=tiny_tokenizer, type="Q4_K_M")
    assert (tmp_path / "c.gguf").read_bytes() == (tmp_path / "d.gguf").read_bytes()


@pytest.mark.parametrize("fmt, recipe, layer", [
    ("gptq", Recipe("rtn-int4-g128", overrides=[("*.mlp.down_proj", "rtn-int8")]), "mlp.down_proj"),
    ("awq", Recipe("rtn-int4-g128", overrides=[("*.mlp.down_proj", "rtn-int4-g64")]), "mlp.down_proj")])
def test_one_scheme_per_model_layouts_name_the_odd_layer(base, tiny_tokenizer, tmp_path, fmt, recipe, layer):
    model = quantised(base, recipe, tiny_tokenizer)
    with pytest.raises(LowbitError) as e:
        get_exporter(fmt).export(model, tmp_path / "x", tokenizer=tiny_tokenizer)
    message = str(e.value)
    assert "\n" not in message and layer in message and "one" in message and "QuantSpec(" not in message
    assert not (tmp_path / "x").exists()


def test_refusals_describe_the_scheme(base, tiny_tokenizer, tmp_path):
    model = quantised(base, "rtn-uint4-g32-zfp16", tiny_tokenizer)
    with pytest.raises(LowbitError) as e:
        get_exporter("gguf").export(model, tmp_path / "x.gguf", tokenizer=tiny_tokenizer)
    assert "fp16 zero points" in str(e.value)
    model = quantised(base, "w8a8", tiny_tokenizer)
    with pytest.raises(LowbitError, match="W8A8"):
        get_exporter("gptq").export(model, tmp_path / "y", tokenizer=tiny_tokenizer)
