"""llama.cpp's quantisers as methods: importance weighting, the file-type rules against the tensor counts
llama.cpp prints for Llama-2-7B, configs and the module. (The block types themselves: tests/weights.)"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.ggml_search import searches
from lowbit.methods.base import LayerInfo, method_from_dict, parse_method
from lowbit.methods.ggml_mix import tensor_type, use_more_bits
from lowbit.methods.ggml_quant import GGMLQuant
from lowbit.methods.stats import LayerStats
from lowbit.nn.ggml_linear import GGMLLinear
from lowbit.weights.ggml import BLOCK_TYPES, dequantize_ggml, quantize_ggml
from tests.weights.ggml_helpers import awkward_weights

TYPES = list(BLOCK_TYPES)
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def block_errors(w, name, data, importance=None):
    err = (dequantize_ggml(data, name, w.shape[1]).double() - w.double()) ** 2
    if importance is not None:
        err = err * importance.double()
    return err.reshape(w.shape[0], -1, BLOCK_TYPES[name].block_size).sum(-1)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_importance_lowers_the_weighted_error(name):
    w = awkward_weights(seed=5)
    imp = torch.ones(512)
    imp[torch.randperm(512, generator=torch.Generator().manual_seed(6))[:64]] = 100.0
    plain = block_errors(w, name, quantize_ggml(w, name, None, search=False), imp).sum()
    weighted = block_errors(w, name, quantize_ggml(w, name, imp, search=False), imp).sum()
    assert weighted < 0.9 * plain


def llama_tensor_names(n_layers: int) -> list[str]:
    roles = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    return ["token_embd.weight", "output.weight"] + [f"blk.{i}.{r}.weight" for i in range(n_layers) for r in roles]


@pytest.mark.parametrize("ftype,expected", [
    # llama.cpp's load log for Llama-2-7B (32 layers, no GQA) at these file types.
    ("q4_k_m", {"Q4_K": 193, "Q6_K": 33}),
    ("q5_k_m", {"Q5_K": 193, "Q6_K": 33}),
    ("q3_k_m", {"Q3_K": 129, "Q4_K": 92, "Q5_K": 4, "Q6_K": 1}),
    ("q6_k", {"Q6_K": 226}),
    ("q8_0", {"Q8_0": 226}),
])
def test_file_type_counts_for_llama2_7b(ftype, expected):
    counts = Counter(tensor_type(ftype, n, 32, 4096) for n in llama_tensor_names(32))
    assert dict(counts) == expected


def test_more_bits_layers_and_fixed_tensors():
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert tensor_type("q4_k_m", "output_norm.weight", 4) == "F32"
    assert tensor_type("q4_0", "output.weight", 4, 4096) == "Q6_K"
    assert tensor_type("q4_k_m", "token_embd.weight", 4, 4096, tied_embeddings=True) == "Q6_K"
    assert tensor_type("q2_k", "blk.0.attn_v.weight", 4, 4096, n_gqa=4) == "Q4_K"
    assert tensor_type("q4_0", "blk.0.ffn_down.weight", 8, 4096, imatrix=True) == "Q4_1"


def test_method_names_configs_and_per_layer_choice():
    mix = parse_method("q4_k_m")
    assert mix.short_name() == "q4_k_m" and mix.required_stats == ()
    assert method_from_dict(mix.to_dict()) == mix
    assert parse_method("q3_k_m-imatrix").required_stats == ("hessian",)
    per_layer = [mix.for_layer(LayerInfo(f"model.layers.{i}.self_attn.v_proj", "attn_v", i, 4)).type
                 for i in range(4)]
    assert per_layer == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert mix.for_layer(LayerInfo("model.layers.0.mlp.up_proj", "ffn_up", 0, 4)) == GGMLQuant(type="Q4_K")
    assert mix.for_layer(LayerInfo("lm_head", "output", None, 4)).type == "Q6_K"
    assert parse_method("ggml-q5_0-ref") == GGMLQuant(type="Q5_0", search=False)
    with pytest.raises(LowbitError):
        parse_method("q4_k_m-fast")


def test_imatrix_comes_from_the_calibration_gram_matrix():
    x = torch.randn(50, 256)
    stats = LayerStats(256)
    stats.update(x)
    w = torch.randn(8, 256)
    got = GGMLQuant(type="Q4_K", imatrix=True).quantize_weight(w, stats)
    with searches():   # the method runs the compiled searches when they load
        want = quantize_ggml(w, "Q4_K", imatrix=(x.double() ** 2).mean(0).float())
    assert np.array_equal(got.data.numpy(), want)
    with pytest.raises(LowbitError, match="calibration"):
        GGMLQuant(type="Q4_K", imatrix=True).quantize_weight(w, LayerStats(256))


def test_ggml_linear_runs_the_blocks_it_holds():
    w, bias, x = torch.randn(16, 256), torch.randn(16), torch.randn(3, 256)
    qt = GGMLQuant(type="Q5_K").quantize_weight(w)
    module = GGMLLinear.from_tensor(qt, bias)
    expected = x @ dequantize_ggml(qt.data, "Q5_K").T + bias
    assert torch.allclose(module(x), expected, atol=1e-5)
    assert module.storage_bytes() == 16 * 176 + 16 * 4 and qt.bits_per_element == 5.5
    rebuilt = GGMLLinear.from_layer_config(module.layer_config())
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt(x), module(x))


def test_quantisation_is_deterministic():
    w = awkward_weights(seed=9)
    assert np.array_equal(quantize_ggml(w, "Q3_K"), quantize_ggml(w.clone(), "Q3_K"))
