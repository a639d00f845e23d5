"""NF4/FP4 blockwise quantisation against bitsandbytes' own quantize_4bit / dequantize_4bit (CPU)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.methods import METHODS, method_from_dict, parse_method
from lowbit.methods.nf4 import FP4, NF4, quantize_4bit
from lowbit.weights.bnb4 import (Quantized4bit, code_table, dynamic_map, pack_nibbles, quantize_blockwise_8bit,
                                 unpack_nibbles)

bnb_f = pytest.importorskip("bitsandbytes.functional")

# element counts that are and are not multiples of the block size, odd ones, and one smaller than a block
SHAPES = [(64, 64), (33, 65), (7,), (3, 5, 129), (1000, 37), (12288,)]


def bnb_quantize(x, block_size, quant_type, double_quant):
    return bnb_f.quantize_4bit(x, blocksize=block_size, quant_type=quant_type, compress_statistics=double_quant)


def bnb_dequantize(packed, state, shape):
    """bnb's dequantize_4bit. Its CPU C kernel assumes every row is made of whole blocks: for an even row
    length that is not a multiple of the block size it scales with the wrong absmax (bnb 0.50.2). There,
    bnb's own reference implementation (the default backend, which its CPU backend itself uses for odd
    row lengths) is the reference: code[q] * absmax[i // block_size]."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    row = shape[-1]
    if row % 2 == 1 or row % state.blocksize == 0:
        return bnb_f.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    reference = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    return reference(packed.reshape(-1), absmax, bnb_f.get_4bit_type(state.quant_type, device="cpu"),
                     state.blocksize, shape, state.dtype)


def assert_same_as_bnb(x, block_size, quant_type, double_quant):
    packed, state = bnb_quantize(x, block_size, quant_type, double_quant)
    q = quantize_4bit(x, block_size, quant_type, double_quant)
    assert torch.equal(q.packed, packed.reshape(-1)), "packed codes differ"
    assert torch.equal(q.absmax, state.absmax), "absmax (or its 8-bit codes) differ"
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_offset, state.offset)
    ours, theirs = q.dequantize(), bnb_dequantize(packed, state, x.shape)
    assert ours.dtype == theirs.dtype == x.dtype
    # bnb returns 1-D tensors as [1, n]; the values are what must agree, bit for bit
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))
    assert ours.shape == x.shape


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_equal_bitsandbytes(shape, quant_type, double_quant):
    torch.manual_seed(10 * SHAPES.index(shape) + 2 * (quant_type == "fp4") + double_quant)
    x = torch.randn(shape) * 0.03
    assert_same_as_bnb(x, 64, quant_type, double_quant)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [32, 128, 4096])
def test_bytes_equal_bitsandbytes_dtypes_and_block_sizes(dtype, block_size):
    torch.manual_seed(block_size)
    x = (torch.randn(257, 96) * 0.05).to(dtype)
    assert_same_as_bnb(x, block_size, "nf4", True)
    assert_same_as_bnb(x, block_size, "fp4", False)


@pytest.mark.parametrize("case", ["zeros", "constant", "zero_block", "heavy_tail", "many_blocks"])
def test_edge_cases_equal_bitsandbytes(case):
    """All-zero and constant tensors (the second level's absmax is 0), a zero block among others,
    outliers, and 1004 blocks (a partial block of 256 absmax values at the second level)."""
    torch.manual_seed(3)
    x = {"zeros": lambda: torch.zeros(256, 64), "constant": lambda: torch.ones(300, 64),
         "zero_block": lambda: torch.randn(130, 64).index_fill_(0, torch.tensor([5]), 0.0),
         "heavy_tail": lambda: torch.randn(64 * 1003 + 5) * torch.rand(64 * 1003 + 5) ** 8 * 1e3,
         "many_blocks": lambda: torch.randn(1004, 64) * 0.02}[case]()
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            assert_same_as_bnb(x, 64, quant_type, dq)


def test_values_on_bnb_decision_boundaries():
    """Scaled values exactly on (and one ulp around) every midpoint of both code books, +0 and -0:
    the tie rules (a midpoint goes to the lower level; FP4's two zeros) must be bnb's."""
    for quant_type in ("nf4", "fp4"):
        levels = torch.sort(code_table(quant_type)).values
        mids = (levels[1:] + levels[:-1]) / 2
        vals = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                          torch.tensor([0.0, -0.0, 1e-6, -1e-6])])
        # one block per value, its absmax 1.0 (so the scaled value is the value itself)
        x = torch.zeros(vals.numel(), 64)
        x[:, 0], x[:, 1] = vals, 1.0
        assert_same_as_bnb(x, 64, quant_type, False)


def test_dynamic_map_is_bnb_map():
    assert torch.equal(dynamic_map(), bnb_f.create_dynamic_map())


def test_blockwise_8bit_equals_bnb_quantize_blockwise():
    """bnb's CPU 8-bit kernel rounds through a 65536-point grid; an exact nearest-level search would
    disagree with it on a fraction of values, so this compares against bnb itself."""
    torch.manual_seed(0)
    x = torch.randn(100_003)
    codes, absmax = quantize_blockwise_8bit(x, 256)
    ref_codes, ref_state = bnb_f.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)


def test_nibble_order_first_element_high():
    codes = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0xF0]
    assert torch.equal(unpack_nibbles(packed, 3), codes[:3])


@pytest.mark.parametrize("shape", [(768, 256), (33, 65), (5,)])
def test_storage_bits_closed_form(shape):
    n = math.prod(shape)
    blocks = -(-n // 64)
    plain = quantize_4bit(torch.randn(shape), 64, "nf4", False)
    dq = quantize_4bit(torch.randn(shape), 64, "nf4", True)
    assert plain.storage_bits == 8 * (-(-n // 2)) + 32 * blocks
    assert dq.storage_bits == 8 * (-(-n // 2)) + 8 * blocks + 32 * (-(-blocks // 256)) + 32
    if shape == (768, 256):
        assert plain.bits_per_element == 4.5


def test_bits_per_element_of_a_4096_square_weight():
    """NF4 b64: 4 + 32/64 = 4.5 bits; double-quantised: 4 + 8/64 + 32/(64*256) + one fp32 offset ≈ 4.127."""
    n = 4096 * 4096
    dq = quantize_4bit(torch.randn(4096, 4096), 64, "nf4", True)
    assert dq.bits_per_element == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / n, abs=1e-12)
    assert round(dq.bits_per_element, 3) == 4.127
    assert NF4().quantize_weight(torch.randn(64, 64)).bits_per_element == 4.5


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.sampled_from(["nf4", "fp4"]), st.floats(1e-3, 1e3))
def test_error_bounded_by_half_the_widest_gap(n, quant_type, scale):
    """|x - x̂| ≤ absmax · (widest gap between neighbouring levels) / 2, for every element."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale
    q = quantize_4bit(x, 64, quant_type, False)
    levels = torch.sort(code_table(quant_type)).values
    half_gap = float((levels[1:] - levels[:-1]).max()) / 2
    bound = q.block_absmax().repeat_interleave(64)[:n] * half_gap * (1 + 1e-6)
    assert ((x - q.dequantize()).abs() <= bound).all()


def test_double_quant_error_small_against_plain():
    """The 8-bit second level moves each block's absmax by at most half a dynamic-map step of the block's
    absmax deviation; the weight error grows by well under 1%."""
    torch.manual_seed(1)
    w = torch.randn(512, 512) * 0.02
    plain, dq = quantize_4bit(w, 64, "nf4", False), quantize_4bit(w, 64, "nf4", True)
    rel = (dq.block_absmax() - plain.absmax).abs() / plain.absmax
    assert float(rel.max()) < 0.02
    e_plain = float((w - plain.dequantize()).norm())
    e_dq = float((w - dq.dequantize()).norm())
    assert e_dq < 1.01 * e_plain


def test_nf4_beats_rtn_int4_same_block_on_gaussian_weights():
    """NF4's levels are normal quantiles: on Gaussian weights it has lower MSE than symmetric int4
    absmax RTN with the same block of 64 (both one fp32-class scale per block)."""
    from lowbit.methods import RTN

    torch.manual_seed(2)
    w = torch.randn(256, 512) * 0.02
    nf4_err = float((w - NF4().quantize_weight(w).dequantize()).pow(2).mean())
    rtn_err = float((w - RTN(bits=4, group_size=64).quantize_weight(w).dequantize()).pow(2).mean())
    assert nf4_err < 0.85 * rtn_err


def test_method_registry_and_short_names():
    assert METHODS["nf4"] is NF4 and METHODS["fp4"] is FP4
    assert parse_method("nf4") == NF4()
    assert parse_method("nf4-dq") == NF4(double_quant=True)
    assert parse_method("nf4-b128") == NF4(block_size=128)
    assert parse_method("fp4-dq-fp32") == FP4(double_quant=True, compute_dtype="fp32")
    for cfg in (NF4(), NF4(double_quant=True, block_size=128), FP4(compute_dtype="fp16")):
        assert parse_method(cfg.short_name()) == cfg
        assert method_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LowbitError):
        parse_method("nf4-b100")
    with pytest.raises(LowbitError):
        parse_method("nf4-int4")


def test_quantize_weight_matches_bnb_and_rejects_bad_input():
    torch.manual_seed(4)
    w = torch.randn(48, 80)
    q = FP4(double_quant=True).quantize_weight(w, None)
    assert isinstance(q, Quantized4bit) and q.quant_type == "fp4"
    packed, _ = bnb_quantize(w, 64, "fp4", True)
    assert torch.equal(q.packed, packed.reshape(-1))
    with pytest.raises(LowbitError):
        quantize_4bit(torch.tensor([1.0, float("nan")]))
    with pytest.raises(LowbitError):
        quantize_4bit(torch.randn(8), block_size=48)
