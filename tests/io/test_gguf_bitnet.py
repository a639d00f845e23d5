"""BitNet b1.58 models in GGUF: ternary weights are written as TQ1_0 / TQ2_0 blocks holding exactly our values
(gguf-py reads them back; its quantiser writes the same bytes), and llama.cpp loads and runs them.

Run the llama.cpp part: .venv/bin/python -m pytest -m interop -s tests/io/test_gguf_bitnet.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from lowbit.errors import LowbitError
from lowbit.io.gguf import export_gguf, gguf_names
from lowbit.methods import BitNet
from lowbit.nn import TernaryLinear
from tests.io.test_gguf import convert_hf_permute

pytestmark = pytest.mark.usefixtures("one_thread")


def _bitnet(packing="trit5"):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.api import quantize

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
    return quantize(LlamaForCausalLM(config).eval(), BitNet(packing=packing))


@pytest.fixture(scope="module")
def bitnet():
    return _bitnet()


def ternary_weight(model, gguf: str) -> torch.Tensor:
    """Our dequantised weight of GGUF tensor `gguf`, q/k rows in convert_hf_to_gguf's order."""
    hf = {g: h for h, g in gguf_names(model).items()}[gguf]
    w = model.get_submodule(hf).dequantized_weight()
    heads = {".attn_q.": model.config.num_attention_heads, ".attn_k.": model.config.num_key_value_heads}
    return next((convert_hf_permute(w, n) for key, n in heads.items() if key in gguf), w)


def _tensors(path) -> dict:
    return {t.name: (GGMLQuantizationType(t.tensor_type).name, np.array(t.data)) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("ftype, expected", [(None, "TQ1_0"), ("TQ2_0", "TQ2_0")])
def test_ternary_weights_are_stored_exactly_as_tq_blocks(bitnet, tiny_tokenizer, tmp_path, ftype, expected):
    path = export_gguf(bitnet, tmp_path / "b.gguf", tokenizer=tiny_tokenizer, type=ftype)
    tensors = _tensors(path)
    assert tensors["token_embd.weight"][0] == "Q4_K" and tensors["output.weight"][0] == "Q6_K"   # llama.cpp's mix
    ternary = {n: v for n, v in tensors.items() if n.startswith("blk.") and not n.endswith("norm.weight")}
    assert len(ternary) == 7
    kind = GGMLQuantizationType[expected]
    for name, (stored, data) in ternary.items():
        assert stored == expected
        ours = ternary_weight(bitnet, name)
        theirs = quants.dequantize(data, kind).reshape(ours.shape)
        assert np.array_equal(theirs, ours.numpy()), name
        assert np.array_equal(quants.quantize(ours.numpy(), kind).reshape(-1), data.reshape(-1)), name
    assert GGUFReader(path).fields["general.file_type"].contents() == {"TQ1_0": 36, "TQ2_0": 37}[expected]


def test_2bit_packing_exports_as_tq2_0_and_other_types_are_refused(tiny_tokenizer, tmp_path):
    model = _bitnet("2bit")
    assert isinstance(model.model.layers[0].mlp.up_proj, TernaryLinear)
    path = export_gguf(model, tmp_path / "b.gguf", tokenizer=tiny_tokenizer)
    assert _tensors(path)["blk.0.ffn_up.weight"][0] == "TQ2_0"
    with pytest.raises(LowbitError, match="TQ2_0 blocks but the file type asked for stores it as Q4_K"):
        export_gguf(model, tmp_path / "c.gguf", tokenizer=tiny_tokenizer, type="Q4_K_M")


# ------------------------------------------------------------------------------------------------------------
# llama.cpp itself

@pytest.fixture(scope="module")
def bundled_bitnet():
    from lowbit.api import load_model, quantize
    from lowbit.data import bundled_text

    model, tok = load_model(None)
    ids = tok(bundled_text("eval")[:60000])["input_ids"]
    return quantize(model.float().eval(), BitNet()), tok, [ids[i * 256:(i + 1) * 256] for i in range(2)]


@pytest.mark.interop
@pytest.mark.parametrize("ftype", ["TQ1_0", "TQ2_0"])
def test_llama_cpp_runs_the_ternary_file_as_we_do(bundled_bitnet, tmp_path, ftype):
    """The bundled model ternarised post-training (a poor model, but one whose logits are far from uniform):
    llama.cpp's logits against our model read back from the file (same weights, float activations; llama.cpp
    rounds its activations to 8 bits per 256-block), and against our TernaryLinear model (int8 per token)."""
    from tests.io.test_gguf_llamacpp import agreement, llama_cpp_logits, record, torch_logits

    from lowbit.io.gguf_read import load_gguf

    model, tok, windows = bundled_bitnet
    path = export_gguf(model, tmp_path / f"bitnet-{ftype}.gguf", tokenizer=tok, type=ftype)
    theirs = llama_cpp_logits(path, windows)
    reread = agreement(theirs, torch_logits(load_gguf(path)[0], windows))
    ours = agreement(theirs, torch_logits(model, windows))
    record(f"bitnet {ftype} llama.cpp vs the file read back / vs our TernaryLinear model", [reread, ours])
    assert reread["top1_agreement"] >= 0.95 and reread["mean_abs_diff"] < 0.06
    assert ours["top1_agreement"] >= 0.9 and ours["mean_abs_diff"] < 0.15
