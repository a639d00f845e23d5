"""The quantised KV cache in transformers models: what attention reads, what it holds, what it costs."""
import pytest
import torch

from lowbit.calc import kv_cache_memory, quantized_kv_cache_memory
from lowbit.errors import LowbitError
from lowbit.nn.kv_cache import QuantizedKVCache, QuantizedKVLayer, cache_nbytes
from lowbit.weights.kv import KVSpec
from tests.eval.helpers import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama(max_positions=512)


def test_attention_reads_the_quantised_past_and_the_exact_window():
    from lowbit.core import QuantSpec, fake_quantize

    spec = KVSpec("int4", group_size=8, residual=16)
    layer = QuantizedKVLayer(spec)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    for start, n in ((0, 13), (13, 1), (14, 20), (34, 6)):   # a prefill, then steps of various sizes
        keys, values = layer.update(k[:, :, start:start + n], v[:, :, start:start + n])
    assert layer.get_seq_length() == 40 and layer.n_quantized == 32 and keys.shape == (1, 2, 40, 8)
    # independent reference: tokens 0..31 in two chunks of 16, keys per channel over 8 tokens, values per token
    for c in range(2):
        ref_k = fake_quantize(k[:, :, 16 * c:16 * c + 16].transpose(-1, -2).reshape(-1, 16),
                              QuantSpec("uint4", "group", 8, symmetric=False)).reshape(1, 2, 8, 16).transpose(-1, -2)
        ref_v = fake_quantize(v[:, :, 16 * c:16 * c + 16].reshape(-1, 8),
                              QuantSpec("uint4", "group", 8, symmetric=False)).reshape(1, 2, 16, 8)
        assert torch.allclose(keys[:, :, 16 * c:16 * c + 16], ref_k, atol=1e-6)
        assert torch.allclose(values[:, :, 16 * c:16 * c + 16], ref_v, atol=1e-6)
    assert torch.equal(keys[:, :, 32:], k[:, :, 32:]) and torch.equal(values[:, :, 32:], v[:, :, 32:])


@pytest.mark.parametrize("scheme", [None, "int8", "int4", "fp8", "int2-g32"])
def test_live_memory_equals_the_calculator(llama, scheme):
    from lowbit.eval.kv import fill_cache

    model = llama.to(torch.float16)
    c = model.config
    cache = fill_cache(model, scheme, 300, chunk=128)
    head_dim = c.hidden_size // c.num_attention_heads
    args = (c.num_hidden_layers, c.num_key_value_heads, head_dim, 300, 1)
    expected = kv_cache_memory(*args).bytes if scheme is None else quantized_kv_cache_memory(*args, scheme).bytes
    assert cache_nbytes(cache) == expected


def test_generate_uses_the_cache(llama):
    model = llama.float()
    ids = torch.arange(1, 21).unsqueeze(0)
    cache = QuantizedKVCache("int8-g16", config=model.config)
    out = model.generate(ids, cache=cache, max_new_tokens=120, do_sample=False, min_new_tokens=120)
    assert out.shape[1] == 140 and cache.get_seq_length() == 139 and cache.layers[0].n_quantized == 128
    ref = model.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(out[:, :30], ref)       # before any chunk is quantised the cache is exact


def test_unsupported_uses_are_refused(llama):
    from tests.conftest import build_tiny_model

    with pytest.raises(LowbitError, match="full-attention layers only"):
        QuantizedKVCache("int4", config=build_tiny_model("gemma2").config)
    cache = QuantizedKVCache("int4", config=llama.config)
    with pytest.raises(LowbitError, match="beam search"):
        cache.layers[0].reorder_cache(torch.tensor([0]))
    with pytest.raises(LowbitError, match="config or num_layers"):
        QuantizedKVCache("int4")


def test_the_kv_cache_command(tiny_model_dir, capsys):
    from lowbit.cli import main

    folder = tiny_model_dir("llama")
    argv = ["kv-cache", str(folder), "--schemes", "fp16,int8-g16", "--context", "64", "--max-eval-tokens", "256",
            "--memory-tokens", "300", "--no-speed", "--json", "--threads", "1"]
    assert main(argv) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [r["kv_cache"] for r in rows] == ["fp16", "int8-g16-r128"]
    assert all(r["bytes_300"] == r["calc_bytes_300"] for r in rows) and rows[1]["ratio_300"] > 1.2
    # learned positions (GPT-2: 128) cannot hold 4096 tokens; bad token counts and schemes: one line each
    assert main(["kv-cache", str(tiny_model_dir("gpt2")), "--memory-tokens", "4096", "--no-speed"]) == 2
    assert main(argv[:-4] + ["--memory-tokens", "0"]) == 2
    assert main(["kv-cache", str(folder), "--schemes", "int4-g0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "learned positions for 128" in err[0]
    with pytest.raises(LowbitError, match="cannot be cropped"):
        QuantizedKVCache("int4", num_layers=1).layers[0].crop(1)
