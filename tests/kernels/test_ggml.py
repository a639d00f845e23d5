"""Fused kernels for GGMLLinear, every block type, against the Python path, on every instruction set.

Decoded tiles equal dequantize_ggml bit for bit (awkward weights: outliers, zero blocks, constants, tiny
values); products within the accumulation-order bound of helpers.py (the offsets are ggml's dmin * m).
"""
import pytest
import torch

from lowbit.kernels import native
from lowbit.nn import GGMLLinear
from lowbit.weights.ggml import BLOCK_TYPES, quantize_to_tensor, unpack_ggml
from tests.kernels.helpers import assert_accumulation_close, isa, kernels_or_skip  # noqa: F401
from tests.weights.ggml_helpers import awkward_weights

from lowbit.kernels.fused import KERNEL_GGML_TYPES

TYPES = [t for t, b in BLOCK_TYPES.items() if b.type_id in KERNEL_GGML_TYPES]


def magnitude(m: GGMLLinear) -> torch.Tensor:
    w = m.dequantized_weight().abs()
    off = unpack_ggml(m.blocks, m.type).offsets()
    if off is None:
        return w
    per = w.shape[1] * w.shape[0] // off.numel()                # weights per offset
    return w + off.abs().reshape(w.shape[0], -1).repeat_interleave(per, 1)


def layer(type_name: str, cols: int, seed=0) -> GGMLLinear:
    w = awkward_weights(rows=24, cols=cols, seed=seed)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(seed))
    return GGMLLinear.from_tensor(quantize_to_tensor(w, type_name, search=False), bias)


def widths(type_name: str) -> list[int]:
    """Whole chunks, and (32-weight types) a partial last chunk and fewer columns than a chunk."""
    return [512, 768] if BLOCK_TYPES[type_name].block_size == 256 else [512, 416, 96]


@pytest.mark.parametrize("type_name", TYPES)
def test_ggml_matches_python_path(isa, type_name):  # noqa: F811
    for cols in widths(type_name):
        m = layer(type_name, cols)
        plan = m.build_plan()
        assert torch.equal(plan.decode(0, 24), m.dequantized_weight()[:, plan.order()])
        for rows in (1, 2, 4, 7, 19):
            x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
            with torch.no_grad():
                assert_accumulation_close(m(x), m.python_forward(x), x, magnitude(m))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q6_K", "Q8_0"])
def test_ggml_bf16_activations(isa, type_name):  # noqa: F811
    m = layer(type_name, 512, seed=3)
    x = torch.randn(3, 5, 512, generator=torch.Generator().manual_seed(7)).bfloat16()
    with torch.no_grad():
        y = m(x)
        assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 24)
        assert_accumulation_close(y, m.python_forward(x), x, magnitude(m), bf16_output=True)


def test_plain_types_keep_the_python_path():
    kernels_or_skip()
    m = GGMLLinear.from_tensor(quantize_to_tensor(torch.randn(8, 64), "F16"))
    assert m.build_plan() is None
    assert {"Q4_0", "Q4_K", "Q6_K", "Q8_0"} <= set(TYPES)
    for name in set(BLOCK_TYPES) - set(TYPES):    # the ternary types: no fused decoder yet
        assert layer(name, 512).build_plan() is None, name


def test_instruction_sets_agree_to_accumulation_order():
    """The same product on every instruction set: equal up to the order of the sums."""
    kernels_or_skip()
    m = layer("Q4_K", 512, seed=5)
    x = torch.randn(2, 512)
    outs = {}
    try:
        for name in native.supported_isas():
            native.set_isa(name)
            m._plan = None
            with torch.no_grad():
                outs[name] = m(x)
    finally:
        native.set_isa("auto")
    for y in outs.values():
        assert_accumulation_close(y, outs[next(iter(outs))], x, magnitude(m))
