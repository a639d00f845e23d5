import pytest

from lowbit.calc import bits_per_weight, kv_cache_memory, weight_memory, weight_table
from lowbit.errors import LowbitError


def test_70b_weights_at_each_precision():
    gb = {r.precision: r.gb for r in weight_table(70e9)}
    assert [gb[p] for p in ("fp32", "fp16", "int8", "int4", "int2")] == pytest.approx([280, 140, 70, 35, 17.5])


def test_group_overhead():
    assert bits_per_weight(4, 128, 16) == 4.125
    assert bits_per_weight(4, 64, 16, 4) == 4 + 20 / 64
    assert weight_memory(70e9, 4, 128).gb == pytest.approx(70e9 * 4.125 / 8 / 1e9)


def test_kv_cache_80_layers_64_heads_128k_fp16():
    size = kv_cache_memory(80, 64, 128, 131072, 1, "fp16")
    assert size.bytes == 2 * 80 * 64 * 128 * 131072 * 2
    assert round(size.gb, 1) == 343.6 and size.gib == 320


def test_grouped_query_attention_scales_with_kv_heads():
    full = kv_cache_memory(80, 64, 128, 4096).bytes
    gqa = kv_cache_memory(80, 8, 128, 4096).bytes
    assert full == 8 * gqa


@pytest.mark.parametrize("kwargs", [dict(layers=0), dict(dtype="fp12"), dict(seq_len=-5)])
def test_bad_kv_input(kwargs):
    args = dict(layers=2, kv_heads=2, head_dim=8, seq_len=16, batch=1, dtype="fp16") | kwargs
    with pytest.raises(LowbitError):
        kv_cache_memory(**args)


def test_quantized_kv_cache_closed_form():
    from lowbit.calc import quantized_kv_cache_memory

    # int4, groups of 64: 4 bits + (fp16 scale + one-byte zero) / 64 = 4.375 bits per element in whole chunks
    whole = quantized_kv_cache_memory(32, 8, 128, 32768, 1, "int4")
    assert whole.bytes == 2 * 32 * 8 * 128 * 32768 * 4.375 / 8
    # 200 tokens: one chunk of 128 quantised, the newest 72 at fp16
    part = quantized_kv_cache_memory(2, 2, 64, 200, 1, "int8-g64-r128")
    assert part.bytes == 2 * 2 * 2 * 64 * (128 * (8 + 24 / 64) + 72 * 16) / 8


def test_calc_kv_cache_scheme_cli(capsys):
    from lowbit.cli import main

    assert main(["calc", "kv-cache", "--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--seq-len", "32768",
                 "--scheme", "int4", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["bits_per_element"] == 4.375
    assert main(["calc", "kv-cache", "--layers", "1", "--kv-heads", "1", "--head-dim", "64", "--seq-len", "8",
                 "--scheme", "int5"]) == 2
