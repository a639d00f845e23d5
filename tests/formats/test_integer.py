import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import IntFormat, get_format


@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_grid_is_twos_complement(bits):
    fmt = get_format(f"int{bits}")
    assert fmt.values().tolist() == list(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    codes = torch.arange(1 << bits)
    # independent two's complement reading of each code
    expected = [c - (1 << bits) if c >= 1 << (bits - 1) else c for c in codes.tolist()]
    assert fmt.decode(codes).tolist() == expected


@pytest.mark.parametrize("bits", range(2, 9))
def test_unsigned_grid(bits):
    assert get_format(f"uint{bits}").values().tolist() == list(range(2**bits))


def test_round_half_to_even_and_saturation():
    fmt = get_format("int4")
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 6.7, 7.5, 100.0, -8.4, -100.0])
    assert fmt.round(x).tolist() == [0, 2, 2, -2, 7, 7, 7, -8, -8]
    assert fmt.encode(torch.tensor([-1.0, -8.0, 7.0])).tolist() == [0xF, 0x8, 0x7]


@pytest.mark.parametrize("bits", [0, 9, 2.5])
def test_bits_out_of_range(bits):
    with pytest.raises(LowbitError, match="bits"):
        IntFormat(bits, signed=True)


def test_unknown_format_name_is_a_clear_error():
    with pytest.raises(LowbitError, match="unknown number format 'int9'"):
        get_format("int9")
