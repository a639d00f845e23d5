"""Ternary weights (BitNet b1.58): the 5-trits-per-byte and 2-bit packings, the true size, and llama.cpp's
TQ1_0 / TQ2_0 blocks against gguf-py's reference quantiser byte for byte."""
import itertools

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lowbit.core.packing import byte_trits, pack_trits, trit_bytes, unpack_trits
from lowbit.errors import LowbitError
from lowbit.weights.ggml import dequantize_ggml, ggml_from_ternary, quantize_ggml, retype_ternary
from lowbit.weights.ternary import TernaryWeight


def test_every_five_trit_byte_decodes_to_its_digits():
    digits = torch.tensor(list(itertools.product(range(3), repeat=5))).T        # [5, 243]
    b = trit_bytes(digits)
    assert len(set(b.tolist())) == 243
    assert torch.equal(byte_trits(b, 5), digits)
    four = digits[:4, ::3]                                                       # the 81 four-trit bytes (qh)
    assert torch.equal(byte_trits(trit_bytes(four), 4), four)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 999, 1000])
def test_trit_stream_round_trips_at_1_6_bits(n):
    codes = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack_trits(codes)
    assert packed.numel() == -(-n // 5)
    assert torch.equal(unpack_trits(packed, n), codes.to(torch.int8))


@pytest.mark.parametrize("packing, bits, per_byte", [("trit5", 1.6, 5), ("2bit", 2.0, 4)])
def test_true_size_and_values(packing, bits, per_byte):
    codes = torch.randint(-1, 2, (256, 768), generator=torch.Generator().manual_seed(0))
    w = TernaryWeight.from_codes(codes, 0.0123, packing)
    assert w.nbytes == w.packed.numel() + 2 == -(-256 * 768 // per_byte) + 2
    assert w.bits_per_element == pytest.approx(bits, abs=1e-3)
    assert w.scale.dtype == torch.float16 and float(w.scale) == float(torch.tensor(0.0123).half())
    assert torch.equal(w.dequantize(), codes.float() * float(w.scale))
    other = w.repacked("2bit" if packing == "trit5" else "trit5")
    assert torch.equal(other.dequantize(), w.dequantize())


def test_bad_ternary_input_is_one_clear_error():
    with pytest.raises(LowbitError, match="-1, 0 or \\+1"):
        TernaryWeight.from_codes(torch.tensor([[2, 0]]), 1.0)
    with pytest.raises(LowbitError, match="packing"):
        TernaryWeight.from_codes(torch.zeros(2, 5, dtype=torch.int8), 1.0, "3bit")
    with pytest.raises(LowbitError, match="float16"):
        TernaryWeight.from_codes(torch.zeros(2, 5, dtype=torch.int8), 1e6)
    with pytest.raises(LowbitError, match="uint8 bytes"):
        TernaryWeight(torch.zeros(3, dtype=torch.uint8), torch.ones(()), torch.Size([4, 5]))


def _hard_input():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 768, generator=g)
    w[1, :256] = 0                                     # an all-zero block: d = 0
    w[2, :256] = torch.tensor([1.0, -0.5, 0.5, -1.0] * 64)      # ties at x / d = +-0.5 (roundf: away from zero)
    w[3] *= 1e-3
    return w


@pytest.mark.parametrize("type_name", ["TQ1_0", "TQ2_0"])
def test_tq_blocks_are_gguf_py_s_bytes(type_name):
    w = _hard_input()
    ours = quantize_ggml(w, type_name)
    theirs = quants.quantize(w.numpy(), GGMLQuantizationType[type_name])
    assert np.array_equal(ours, theirs)
    assert torch.equal(dequantize_ggml(ours, type_name),
                       torch.from_numpy(quants.dequantize(theirs, GGMLQuantizationType[type_name])))


@pytest.mark.parametrize("packing, type_name", [("trit5", "TQ1_0"), ("2bit", "TQ2_0"), ("trit5", "TQ2_0")])
def test_a_ternary_weight_is_a_tq_tensor_bit_for_bit(packing, type_name):
    """Per-tensor scale in every block: llama.cpp's values are ours exactly, and gguf-py's quantiser given our
    values (each block's absmax is the scale) writes the very same bytes."""
    codes = torch.randint(-1, 2, (4, 512), generator=torch.Generator().manual_seed(2))
    w = TernaryWeight.from_codes(codes, 0.0371, packing)
    g = ggml_from_ternary(w, type_name)
    assert g.type == type_name and g.nbytes == 4 * 2 * (54 if type_name == "TQ1_0" else 66)
    assert torch.equal(dequantize_ggml(g.data, type_name), w.dequantize())
    theirs = quants.quantize(w.dequantize().numpy(), GGMLQuantizationType[type_name])
    assert np.array_equal(g.data.numpy(), theirs)
    back = retype_ternary(retype_ternary(g, "TQ2_0"), "TQ1_0")
    assert torch.equal(back.dequantize(), w.dequantize())


def test_rows_that_do_not_fill_a_block_are_refused():
    w = TernaryWeight.from_codes(torch.zeros(2, 100, dtype=torch.int8), 1.0)
    with pytest.raises(LowbitError, match="multiple of 256"):
        ggml_from_ternary(w)
