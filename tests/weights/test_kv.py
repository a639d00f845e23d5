"""KV-cache chunks (weights/kv.py) against closed forms: KIVI's grouping, the error bound, the stored bytes."""
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.weights.kv import KVSpec, kv_chunk_bits, quantize_chunk


def states(b=2, h=3, t=64, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=g)
    x[..., 5] *= 20          # an outlier channel, as keys have
    return x


@pytest.mark.parametrize("fmt,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_keys_are_quantised_per_channel_over_groups_of_tokens(fmt, bits):
    spec = KVSpec(fmt, group_size=16, residual=64)
    x = states()
    chunk = quantize_chunk(x, spec, per_channel=True)
    # closed form: for channel c of head h and tokens [16j, 16j+16), scale = (max - min) / (2^bits - 1)
    groups = x.transpose(-1, -2).reshape(2, 3, 32, 4, 16)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).reshape(-1, 4)
    assert torch.all(chunk.scale.float() >= scale) and torch.allclose(chunk.scale.float(), scale, rtol=1e-3)
    err = (chunk.dequantize() - x).abs().transpose(-1, -2).reshape(2, 3, 32, 4, 16)
    assert torch.all(err <= chunk.scale.float().reshape(2, 3, 32, 4, 1) / 2 * (1 + 1e-5))


def test_values_are_quantised_per_token():
    spec = KVSpec("int4", group_size=16, residual=64)
    x = states()
    chunk = quantize_chunk(x, spec, per_channel=False)
    assert tuple(chunk.scale.shape) == (2 * 3 * 64, 2)        # one scale per token and 16 channels
    groups = x.reshape(-1, 2, 16)
    bound = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 15 / 2
    err = (chunk.dequantize() - x).abs().reshape(-1, 2, 16)
    assert torch.all(err <= bound[..., None] * (1 + 1e-3) + 1e-6)


def test_fp8_chunks_round_to_the_e4m3_grid():
    from lowbit.formats import get_format

    spec = KVSpec("fp8_e4m3", group_size=16, residual=64)
    x = states()
    chunk = quantize_chunk(x, spec, per_channel=False)
    s = chunk.scale.float().reshape(2, 3, 64, 2, 1)
    levels = (chunk.dequantize().reshape(2, 3, 64, 2, 16) / s)
    grid = get_format("fp8_e4m3").values()
    assert torch.isin(levels.reshape(-1), grid).all()
    assert levels.abs().max() <= 448


@pytest.mark.parametrize("scheme", ["int8", "int4", "int2", "fp8", "int4-g32"])
def test_stored_bytes_are_the_closed_form(scheme):
    spec = KVSpec.parse(scheme)
    x = states(t=spec.group_size * 2, d=64)
    key_bits, value_bits = kv_chunk_bits(spec, 64)
    k, v = quantize_chunk(x, spec, True), quantize_chunk(x, spec, False)
    assert k.nbytes * 8 == x.numel() * key_bits and v.nbytes * 8 == x.numel() * value_bits
    assert k.codes.dtype == torch.uint8 and k.scale.dtype == torch.float16


def test_bad_specs_and_states_say_what_is_wrong():
    with pytest.raises(LowbitError, match="multiple of the group"):
        KVSpec("int4", group_size=64, residual=100)
    with pytest.raises(LowbitError, match="unknown KV-cache format"):
        KVSpec("int5")
    with pytest.raises(LowbitError, match="cannot read"):
        KVSpec.parse("int4-x3")
    with pytest.raises(LowbitError, match="NaN"):
        quantize_chunk(torch.full((1, 1, 64, 8), float("nan")), KVSpec(), per_channel=True)
    with pytest.raises(LowbitError, match="groups of 64 tokens"):
        quantize_chunk(torch.ones(1, 1, 10, 8), KVSpec(), per_channel=True)
    assert KVSpec.parse("int8-g32") == KVSpec("int8", 32, 128) and KVSpec.parse("fp8").format == "fp8_e4m3"
