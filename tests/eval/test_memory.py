import pytest
import torch
from torch import nn

from lowbit.core import QuantSpec, quantize
from lowbit.eval.memory import model_memory
from lowbit.nn import QuantLinear


def quant_linear(out_f, in_f, spec, bias=False):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
    return QuantLinear.from_quantized(quantize(w, spec), torch.randn(out_f) if bias else None)


def test_int4_g128_quant_linear_bytes_match_closed_form():
    spec = QuantSpec("int4", "group", 128, True, "fp16")
    model = nn.Sequential(nn.Embedding(100, 256), quant_linear(512, 256, spec), nn.LayerNorm(512))
    m = model_memory(model)
    codes, scales = 512 * 256 * 4 // 8, 512 * (256 // 128) * 2
    assert m.quantized_linears == 1 and m.quantized_linear_bytes == codes + scales == 67584
    assert m.bits_per_weight == 4.125
    assert m.quantized_linear_fp16_bytes == 2 * 512 * 256
    assert m.quantized_linear_ratio == pytest.approx(4.125 / 16) and m.quantized_linear_ratio <= 0.27
    others = 100 * 256 + 2 * 512
    assert m.other_bytes == 4 * others and m.total_bytes == 67584 + 4 * others
    assert m.deployed_bytes() == 67584 + 2 * others


def test_asymmetric_with_bias_counts_zeros_and_excludes_bias_from_bits_per_weight():
    spec = QuantSpec("uint4", "group", 128, False, "fp16")
    m = model_memory(nn.Sequential(quant_linear(512, 256, spec, bias=True)))
    weight = 512 * 256 // 2 + 1024 * 2 + 1024 // 2  # codes, fp16 scales, packed 4-bit zeros
    assert m.quantized_linear_bytes == weight + 512 * 4
    assert m.bits_per_weight == 8 * weight / (512 * 256)
    assert m.quantized_linear_fp16_bytes == 2 * (512 * 256 + 512)


def test_shared_storage_is_counted_once():
    emb = nn.Embedding(300, 64)
    head = nn.Linear(64, 300, bias=False)
    head.weight = emb.weight  # tied embeddings
    m = model_memory(nn.ModuleDict({"emb": emb, "head": head}))
    assert m.total_bytes == 300 * 64 * 4 and m.deployed_bytes() == 300 * 64 * 2


def test_integer_buffers_keep_their_size_and_unquantised_model_has_no_bits_per_weight():
    model = nn.Linear(10, 20)
    model.register_buffer("index", torch.zeros(7, dtype=torch.int64))
    m = model_memory(model)
    assert m.bits_per_weight is None and m.quantized_linear_ratio is None
    assert m.deployed_bytes(2) == 2 * 220 + 8 * 7 and m.deployed_bytes(4) == 4 * 220 + 8 * 7


def test_non_persistent_buffers_are_held_but_not_weights():
    model = nn.Linear(10, 20, bias=False)
    model.register_buffer("inv_freq", torch.zeros(16), persistent=False)
    m = model_memory(model)
    assert m.total_bytes == 4 * (200 + 16) and m.deployed_bytes() == 2 * 200
