import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import pack_bits, packed_nbytes, unpack_bits
from lowbit.errors import LowbitError


def reference_pack(codes, bits):
    """Independent reading of the layout: one big little-endian integer, code i at bit i*bits."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= int(c) << (i * bits)
    return list(acc.to_bytes(packed_nbytes(len(codes), bits), "little"))


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_and_layout(bits, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=70))
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_bits(t, bits)
    assert packed.tolist() == reference_pack(codes, bits)
    assert unpack_bits(packed, bits, len(codes)).tolist() == codes


def test_large_vectorised_round_trip():
    for bits in (3, 6):
        codes = torch.randint(0, 2**bits, (1_000_003,), dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.numel() == (1_000_003 * bits + 7) // 8
        assert torch.equal(unpack_bits(packed, bits, codes.numel()), codes)


def test_errors():
    with pytest.raises(LowbitError, match="out of range"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(LowbitError, match="1..8"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(LowbitError, match="bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, 5)
