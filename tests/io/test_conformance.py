"""Every method x every exporter: where the exporter accepts every weight the method made, export then
import gives back the same quantised values bit for bit; where it does not, the export is a one-line
refusal that names the layer and leaves nothing behind."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as t

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.io import EXPORTERS, IMPORTERS, load_format_modules, quantized_weights
from lowbit.methods import METHODS, parse_method

# One short name per registered method (several where a method makes more than one kind of weight).
METHOD_NAMES = ("rtn-int4-g32", "rtn-int8-g32", "rtn-fp8_e4m3-channel", "rtn-uint4-g64", "rtn-int3-g32", "rtn-nf4-g64",
                "gptq-int4-g32",
                "gptq-int4-g32-dynamic", "gptq-int8", "awq-uint4-g32", "nf4", "nf4-dq", "fp4", "w8a8", "w8a8-static",
                "llm-int8", "smoothquant", "bitnet", "ggml-q4_0", "ggml-q8_0", "ggml-q4_k", "q4_k_m", "q3_k_s", "hqq-int4-g64",
                "hqq-int4-g32", "hqq-int2-g16", "spqr", "spqr-int3-g16-actorder", "quip", "quip-4bit", "quip-3.5bit", "aqlm-r1-steps5",
                "rtn-mxfp4", "rtn-nvfp4", "gptq-nvfp4", "rtn-mxint8", "rtn-fp8_e4m3-a8dyn", "rtn-fp8_e4m3-tensor-a8static", "qat-int4-g32",
                "rtn-nvfp4-a4", "rtn-mxfp4-a4")
load_format_modules()
FORMATS = sorted(EXPORTERS)


def test_every_registered_method_is_covered():
    covered = {parse_method(n).name for n in METHOD_NAMES}
    mixes = {n for n, c in METHODS.items() if c.__name__.startswith("GGUF_")}
    assert set(METHODS) - mixes <= covered and covered & mixes


def small_llama():
    torch.manual_seed(0)
    config = t.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    return t.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def quantised(tiny_tokenizer):
    base = small_llama()
    cache = {}

    def get(name):
        if name not in cache:
            model = copy.deepcopy(base)
            api.quantize(model, name, tokenizer=tiny_tokenizer, n_samples=4, seq_len=32, progress=False)
            cache[name] = model
        return cache[name]
    return get


def values(model) -> dict[str, torch.Tensor]:
    return {n: w.dequantize().float() for n, w in quantized_weights(model).items()}


def out_path(tmp_path, fmt):
    return tmp_path / ("m.gguf" if fmt == "gguf" else "m")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_export_import_is_exact_or_refused(quantised, tiny_tokenizer, tmp_path, method, fmt):
    model = quantised(method)
    exporter, held = EXPORTERS[fmt], quantized_weights(model)
    out = out_path(tmp_path, fmt)
    if all(exporter.accepts(w) for w in held.values()):
        exporter.export(model, out, tokenizer=tiny_tokenizer)
        back, _ = IMPORTERS[fmt](out)
        ours, theirs = values(model), values(back)
        assert set(ours) <= set(theirs)
        for name, v in ours.items():
            assert torch.equal(v, theirs[name]), name
    else:
        with pytest.raises(LowbitError) as e:
            exporter.export(model, out, tokenizer=tiny_tokenizer)
        message = str(e.value)
        assert "\n" not in message and "cannot be stored exactly" in message
        assert any(name in message for name in held)
        assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_expected_pairs_are_accepted(quantised):
    def accepted(method):
        held = quantized_weights(quantised(method)).values()
        return sorted(f for f in FORMATS if all(EXPORTERS[f].accepts(w) for w in held))

    assert accepted("rtn-int4-g32") == ["awq", "compressed-tensors", "gguf", "gptq"]
    assert accepted("rtn-int8-g32") == ["compressed-tensors", "gguf", "gptq"]
    assert accepted("gptq-int4-g32-dynamic") == ["gptq"]
    assert accepted("nf4") == accepted("nf4-dq") == ["bnb"]
    assert accepted("q4_k_m") == ["gguf"]
    assert accepted("w8a8") == accepted("w8a8-static") == ["compressed-tensors"]
    assert accepted("rtn-fp8_e4m3-channel") == ["compressed-tensors"]
    assert accepted("spqr") == accepted("hqq-int4-g64") == []   # sparse outliers; float zero points
    assert accepted("quip") == []                                # lattice codes of a rotated weight
    assert accepted("aqlm-r1-steps5") == ["aqlm"]                # additive codebooks: the aqlm package's layout
    assert accepted("bitnet") == ["gguf"]                        # ternary + one fp16 scale: TQ1_0 blocks


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_planned_weights_are_what_the_method_makes(quantised, tiny_tokenizer, method):
    """The placeholders engine checks read before calibration (planned_weight) have the type and scheme
    of the weights the method then makes: every exporter accepts both or neither."""
    from lowbit.pipeline.runner import planned_weights

    planned, _ = planned_weights(small_llama(), method)
    held = quantized_weights(quantised(method))
    assert planned.keys() == held.keys()
    for name, w in held.items():
        assert type(planned[name]) is type(w) and planned[name].shape == w.shape
        ours, theirs = ({f for f in FORMATS if EXPORTERS[f].accepts(x)} for x in (planned[name], w))
        if not getattr(getattr(w, "spec", None), "symmetric", True):
            # GGUF holds an asymmetric g32 weight as Q4_1/Q5_1 only when its values make d*z an fp16 value
            # (the llama.cpp target check therefore refuses asymmetric grids up front)
            ours, theirs = ours - {"gguf"}, theirs - {"gguf"}
        assert ours == theirs, name
