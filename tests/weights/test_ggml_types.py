"""ggml block types (lowbit.weights.ggml) against gguf-py (llama.cpp's own Python library), their byte
layouts against themselves, and closed-form bounds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

import lowbit.weights.ggml as ggml
from lowbit.core.packing import trit_bytes
from lowbit.errors import LowbitError
from tests.weights.ggml_helpers import awkward_weights, extreme_weights, gguf_values, importance
from lowbit.weights.ggml import (BLOCK_TYPES, GGML_TYPES, PLAIN_TYPES, BlockType, GGMLTensor, bits_per_weight,
                                 dequantize_ggml, fit_type, quantize_ggml, quantize_to_tensor, row_nbytes,
                                 unpack_ggml)

TYPES = list(BLOCK_TYPES)
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TERNARY = ["TQ1_0", "TQ2_0"]
FIELD_NAMES = ("d", "q", "sc", "dmin", "m")
# Byte offsets of the fp16 fields in each block: random bytes there get finite values instead.
HALF_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "TQ1_0": [52], "TQ2_0": [64]}
# Bytes a block may hold there: TQ1_0's trit bytes take 243 (qs, five trits) and 81 (qh, four) of 256 values.
TRIT_RUNS = {"TQ1_0": [(0, 48, 5), (48, 52, 4)]}


pytestmark = pytest.mark.usefixtures("one_thread")


def random_blocks(name: str, n=64, seed=1) -> np.ndarray:
    """Arbitrary blocks (every bit of every field exercised); fp16 fields get finite random values."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, BLOCK_TYPES[name].type_size), dtype=np.uint8)
    for at in HALF_FIELDS[name]:
        blocks[:, at:at + 2] = rng.uniform(-1, 1, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    for start, stop, k in TRIT_RUNS.get(name, []):
        digits = torch.from_numpy(rng.integers(0, 3, size=(k, n * (stop - start))))
        blocks[:, start:stop] = trit_bytes(digits).numpy().reshape(n, stop - start)
    return blocks


def test_size_table_equals_gguf_quant_sizes():
    for name, (type_id, block, size) in GGML_TYPES.items():
        qtype = GGMLQuantizationType[name]
        assert (qtype.value, GGML_QUANT_SIZES[qtype]) == (type_id, (block, size))
    for name, bt in BLOCK_TYPES.items():
        assert (bt.name, bt.type_id, bt.block_size, bt.type_size) == (name, *GGML_TYPES[name])
        assert bt.bits_per_weight == bits_per_weight(name) == 8 * bt.type_size / bt.block_size
    for name, (type_id, dtype) in PLAIN_TYPES.items():
        assert (type_id, 1, torch.empty(0, dtype=dtype).element_size()) == GGML_TYPES[name]
    assert bits_per_weight("Q4_K") == 4.5 and bits_per_weight("Q6_K") == 6.5625 and bits_per_weight("F16") == 16


def test_types_register_by_subclassing():
    assert TYPES == LEGACY + K_QUANTS + TERNARY                            # the table's order
    assert all(issubclass(bt, BlockType) and getattr(ggml, name) is bt for name, bt in BLOCK_TYPES.items())
    assert {bt.nsub for bt in BLOCK_TYPES.values()} == {1, 8, 16}
    with pytest.raises(LowbitError, match="Q4_0"):
        class Again(BlockType, type_name="Q4_0"):                          # noqa: F841 - already taken
            pass
    with pytest.raises(LowbitError, match="Q7_K"):
        class Unknown(BlockType, type_name="Q7_K"):                        # noqa: F841 - not in the table
            pass

    class Family(BlockType):                                               # no type_name: a family
        pass
    assert Family not in BLOCK_TYPES.values() and TYPES == list(BLOCK_TYPES)
    with pytest.raises(TypeError):
        ggml.Q4_K()


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_gguf_dequantises_our_bytes_to_our_values(name, search, with_imatrix):
    w = torch.cat([awkward_weights(), extreme_weights()[[0, 2, 3, 4, 5, 6, 7]]])
    data = quantize_ggml(w, name, importance() if with_imatrix else None, search=search)
    assert data.shape == (31, row_nbytes(name, 512)) and data.dtype == np.uint8
    assert torch.equal(dequantize_ggml(data, name, 512), gguf_values(data, name))


@pytest.mark.parametrize("name", TYPES)
def test_random_valid_blocks_decode_like_gguf(name):
    """Our unpacking of arbitrary blocks (not only ones we wrote) matches gguf-py's."""
    data = random_blocks(name).reshape(4, -1)
    assert torch.equal(dequantize_ggml(data, name), gguf_values(data, name))


@pytest.mark.parametrize("name", TYPES)
def test_pack_inverts_unpack_on_random_blocks(name):
    bt = BLOCK_TYPES[name]
    blocks = torch.from_numpy(random_blocks(name, seed=2)).reshape(4, 16, bt.type_size)
    assert torch.equal(bt.pack(bt.unpack(blocks)), blocks)


def assert_same_fields(a, b):
    for field in FIELD_NAMES:
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        assert x is None or torch.equal(x, y), field


@pytest.mark.parametrize("name", TYPES)
def test_unpack_inverts_pack_on_quantised_fields(name):
    bt = BLOCK_TYPES[name]
    w = awkward_weights()
    x = w.reshape(24, -1, bt.nsub, bt.block_size // bt.nsub)
    fields = bt.quantize(x, None, True)
    assert_same_fields(bt.unpack(bt.pack(fields)), fields)


@pytest.mark.parametrize("name", LEGACY)
def test_reference_bytes_equal_gguf_quantiser(name):
    w = awkward_weights(cols=256)
    ours = quantize_ggml(w, name, search=False)
    theirs = quants.quantize(w.numpy(), GGMLQuantizationType[name])
    assert np.array_equal(ours, theirs)


def block_errors(w, name, data, imp=None):
    err = (dequantize_ggml(data, name, w.shape[1]).double() - w.double()) ** 2
    if imp is not None:
        err = err * imp.double()
    return err.reshape(w.shape[0], -1, BLOCK_TYPES[name].block_size).sum(-1)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_search_is_never_worse_than_llama_cpp_per_block(name, with_imatrix):
    """search=True keeps llama.cpp's own candidate in its pool, so per super-block its (importance-
    weighted) error is at most the reference's; over the tensor it is strictly lower but for Q8_0."""
    w = awkward_weights(seed=3)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(4)) ** 3 if with_imatrix else None
    ref = block_errors(w, name, quantize_ggml(w, name, imp, search=False), imp)
    best = block_errors(w, name, quantize_ggml(w, name, imp, search=True), imp)
    assert (best <= ref).all()
    if name != "Q8_0" and name not in TERNARY:     # these have one answer: nothing to search
        assert best.sum() < ref.sum()


def test_q8_0_error_bound():
    """|x - q d| <= d/2 + 127 |d - fp16(d)| with d = amax/127 per block of 32."""
    w = awkward_weights()
    x_hat = dequantize_ggml(quantize_ggml(w, "Q8_0"), "Q8_0")
    d = w.abs().reshape(24, -1, 32).amax(-1, keepdim=True) / 127
    bound = (d / 2 + 127 * (d - d.half().float()).abs()) * (1 + 1e-6) + 1e-12
    assert ((w - x_hat).abs().reshape(24, -1, 32) <= bound).all()


@pytest.mark.parametrize("name,nsub", [("Q2_K", 16), ("Q3_K", 16), ("Q4_K", 8), ("Q5_K", 8), ("Q6_K", 16)])
def test_k_quant_fields_stay_in_their_bit_ranges(name, nsub):
    f = unpack_ggml(quantize_ggml(awkward_weights(), name), name)
    lo, hi = {"Q2_K": (0, 3), "Q3_K": (-4, 3), "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (-32, 31)}[name]
    assert f.q.shape[-2:] == (nsub, 256 // nsub) and lo <= f.q.min() and f.q.max() <= hi


def test_rows_are_quantised_independently_of_chunking():
    w = awkward_weights(rows=600, seed=8)                                  # more rows than one chunk holds
    whole = quantize_ggml(w, "Q4_K", importance())
    parts = [quantize_ggml(w[i:i + 100], "Q4_K", importance()) for i in range(0, 600, 100)]
    assert np.array_equal(whole, np.concatenate(parts))


def test_ggml_tensor():
    w = awkward_weights().to(torch.bfloat16)
    qt = quantize_to_tensor(w, "q5_k")
    assert isinstance(qt, GGMLTensor) and qt.type == "Q5_K" and qt.shape == w.shape
    assert qt.nbytes == 24 * 2 * 176 and qt.bits_per_element == 5.5
    assert qt.dequantize().dtype == torch.bfloat16
    assert torch.equal(qt.dequantize(), dequantize_ggml(qt.data, "Q5_K").to(torch.bfloat16))
    bf16 = quantize_to_tensor(w, "bf16")
    assert torch.equal(bf16.dequantize(), w) and bf16.bits_per_element == 16 and bf16.type == "BF16"


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
    with pytest.raises(LowbitError, match="uint8"):
        dequantize_ggml(np.zeros((2, 18), dtype=np.int8), "Q4_0")
    with pytest.raises(LowbitError, match="expected 64"):
        dequantize_ggml(np.zeros((2, 18), dtype=np.uint8), "Q4_0", cols=64)


def test_fallback_types_follow_llama_cpp():
    fallbacks = [fit_type(t, 96) for t in K_QUANTS]
    assert fallbacks == ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert fit_type("Q4_K", 40) == "F16" and fit_type("Q4_K", 512) == "Q4_K"
