"""ggml block types against gguf-py (llama.cpp's own Python library), closed-form bounds, and the
file-type rules against tensor counts llama.cpp prints for Llama-2-7B."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from lowbit.errors import LowbitError
from lowbit.methods.base import method_from_dict, parse_method
from lowbit.methods.ggml import (BLOCK_TYPES, GGMLQuant, bits_per_weight, dequantize_ggml, fit_type,
                                 quantize_ggml, row_nbytes, unpack_ggml)
from lowbit.methods.ggml_mix import gguf_name, tensor_type, use_more_bits
from lowbit.methods.stats import LayerStats
from lowbit.nn.ggml_linear import GGMLLinear

TYPES = list(BLOCK_TYPES)
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The searches are many small tensor ops: on a shared machine extra threads only add waiting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def awkward_weights(rows=24, cols=512, seed=0) -> torch.Tensor:
    """Gaussian rows plus the cases quantisers get wrong: outliers, zeros, constants, one sign, tiny."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[1, 5] = 0.9                    # one outlier
    w[2] = 0                         # all zero
    w[3] = 0.013                     # constant positive
    w[4] = -w[4].abs()               # all negative
    w[5] *= 1e-6                     # tiny
    w[6, :32] = 0                    # one zero 32-block inside a live super-block
    return w


def gguf_values(data: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("search", [False, True])
def test_gguf_dequantises_our_bytes_to_our_values(name, search):
    w = awkward_weights()
    data = quantize_ggml(w, name, search=search)
    assert data.shape == (24, row_nbytes(name, 512)) and data.dtype == np.uint8
    assert torch.equal(dequantize_ggml(data, name, 512), gguf_values(data, name))


@pytest.mark.parametrize("name", TYPES)
def test_random_valid_blocks_decode_like_gguf(name):
    """Our unpacking of arbitrary blocks (not only ones we wrote) matches gguf-py's: every bit of every
    field is exercised. fp16 fields get finite random values."""
    bt = BLOCK_TYPES[name]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(64, bt.type_size), dtype=np.uint8)
    half_fields = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                   "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[name]
    for at in half_fields:
        blocks[:, at:at + 2] = rng.uniform(-1, 1, 64).astype(np.float16).view(np.uint8).reshape(64, 2)
    data = blocks.reshape(4, -1)
    assert torch.equal(dequantize_ggml(data, name), gguf_values(data, name))


@pytest.mark.parametrize("name", LEGACY)
def test_reference_bytes_equal_gguf_quantiser(name):
    w = awkward_weights(cols=256)
    ours = quantize_ggml(w, name, search=False)
    theirs = quants.quantize(w.numpy(), GGMLQuantizationType[name])
    assert np.array_equal(ours, theirs)


def block_errors(w, name, data, importance=None):
    err = (dequantize_ggml(data, name, w.shape[1]).double() - w.double()) ** 2
    if importance is not None:
        err = err * importance.double()
    return err.reshape(w.shape[0], -1, BLOCK_TYPES[name].block_size).sum(-1)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_search_is_never_worse_than_llama_cpp_per_block(name, with_imatrix):
    """search=True keeps llama.cpp's own candidate in its pool, so per super-block its (importance-
    weighted) error is at most the reference's; over the tensor it is strictly lower for the k-quants."""
    w = awkward_weights(seed=3)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(4)) ** 3 if with_imatrix else None
    ref = block_errors(w, name, quantize_ggml(w, name, imp, search=False), imp)
    best = block_errors(w, name, quantize_ggml(w, name, imp, search=True), imp)
    assert (best <= ref).all()
    if name != "Q8_0":
        assert best.sum() < ref.sum()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_importance_lowers_the_weighted_error(name):
    w = awkward_weights(seed=5)
    imp = torch.ones(512)
    imp[torch.randperm(512, generator=torch.Generator().manual_seed(6))[:64]] = 100.0
    plain = block_errors(w, name, quantize_ggml(w, name, None, search=False), imp).sum()
    weighted = block_errors(w, name, quantize_ggml(w, name, imp, search=False), imp).sum()
    assert weighted < 0.9 * plain


def test_q8_0_error_bound():
    """|x - q d| <= d/2 + 127 |d - fp16(d)| with d = amax/127 per block of 32."""
    w = awkward_weights()
    x_hat = dequantize_ggml(quantize_ggml(w, "Q8_0"), "Q8_0")
    d = w.abs().reshape(24, -1, 32).amax(-1, keepdim=True) / 127
    d16 = d.half().float()
    bound = (d / 2 + 127 * (d - d16).abs()) * (1 + 1e-6) + 1e-12
    assert ((w - x_hat).abs().reshape(24, -1, 32) <= bound).all()


@pytest.mark.parametrize("name,nsub", [("Q2_K", 16), ("Q3_K", 16), ("Q4_K", 8), ("Q5_K", 8), ("Q6_K", 16)])
def test_k_quant_fields_stay_in_their_bit_ranges(name, nsub):
    f = unpack_ggml(quantize_ggml(awkward_weights(), name), name)
    lo, hi = {"Q2_K": (0, 3), "Q3_K": (-4, 3), "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (-32, 31)}[name]
    assert f.q.shape[-2:] == (nsub, 256 // nsub) and lo <= f.q.min() and f.q.max() <= hi


def test_bits_per_weight_match_gguf_sizes():
    for name, bt in BLOCK_TYPES.items():
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert (bt.block_size, bt.type_size) == (block, size)
        assert bits_per_weight(name) == 8 * size / block
    assert bits_per_weight("Q4_K") == 4.5 and bits_per_weight("Q6_K") == 6.5625 and bits_per_weight("F16") == 16


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(LowbitError, match="multiple of 256"):
        quantize_ggml(torch.randn(4, 96), "Q4_K")
    with pytest.raises(LowbitError, match="NaN"):
        quantize_ggml(torch.full((2, 32), float("nan")), "Q8_0")
    with pytest.raises(LowbitError, match="2-D"):
        quantize_ggml(torch.randn(64), "Q8_0")
    with pytest.raises(LowbitError, match="importance"):
        quantize_ggml(torch.randn(2, 64), "Q4_0", imatrix=torch.ones(32))
    with pytest.raises(LowbitError, match="unknown ggml type"):
        quantize_ggml(torch.randn(2, 64), "Q7_K")


def test_fallback_types_follow_llama_cpp():
    fallbacks = [fit_type(t, 96) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")]
    assert fallbacks == ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert fit_type("Q4_K", 40) == "F16" and fit_type("Q4_K", 512) == "Q4_K"


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
    assert gguf_name("model.layers.7.mlp.down_proj") == "blk.7.ffn_down.weight"
    assert gguf_name("lm_head.weight") == "output.weight"


def test_method_names_configs_and_per_layer_choice():
    mix = parse_method("q4_k_m")
    assert mix.short_name() == "q4_k_m" and mix.required_stats == ()
    assert method_from_dict(mix.to_dict()) == mix
    assert parse_method("q3_k_m-imatrix").required_stats == ("hessian",)
    per_layer = [mix.for_layer(f"model.layers.{i}.self_attn.v_proj", 4).type for i in range(4)]
    assert per_layer == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert mix.for_layer("model.layers.0.mlp.up_proj", 4) == GGMLQuant(type="Q4_K")
    assert parse_method("ggml-q5_0-ref") == GGMLQuant(type="Q5_0", search=False)
    with pytest.raises(LowbitError):
        parse_method("q4_k_m-fast")


def test_imatrix_comes_from_the_calibration_gram_matrix():
    x = torch.randn(50, 256)
    stats = LayerStats(256)
    stats.update(x)
    w = torch.randn(8, 256)
    got = GGMLQuant(type="Q4_K", imatrix=True).quantize_weight(w, stats)
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
