"""QuantLinear: the packed buffers reproduce the QuantizedTensor exactly, and the footprint is honest."""
import pytest
import torch

from lowbit.core import QuantSpec, quantize
from lowbit.nn import QuantLinear

SPECS = [QuantSpec("int4", "group", 128), QuantSpec("uint4", "group", 128, symmetric=False), QuantSpec("int8"),
         QuantSpec("int3", "group", 64), QuantSpec("uint2", "group", 32, symmetric=False),
         QuantSpec("uint8", "channel", symmetric=True), QuantSpec("fp8_e4m3", "channel"),
         QuantSpec("nf4", "group", 64, scale_dtype="fp32"), QuantSpec("fp4_e2m1", "group", 32, scale_dtype="e8m0")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.format}-{s.granularity}{s.group_size or ''}")
def test_module_weight_equals_generic_dequantisation(spec):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    b = torch.randn(96)
    q = quantize(w, spec)
    m = QuantLinear.from_quantized(q, b)
    # the module's fast integer path vs the format's value table
    assert torch.equal(m.dequantized_weight(), q.dequantize())
    x = torch.randn(3, 256)
    assert torch.allclose(m(x), x @ q.dequantize().T + b, atol=1e-5)
    rebuilt = m.quantized()
    assert torch.equal(rebuilt.codes, q.codes) and torch.equal(rebuilt.scale, q.scale)


def test_storage_bytes_match_closed_form():
    w = torch.randn(256, 512)
    m = QuantLinear.from_quantized(quantize(w, QuantSpec("uint4", "group", 128, symmetric=False)))
    n_groups = 256 * 4
    assert m.storage_bytes() == 256 * 512 // 2 + n_groups * 2 + n_groups // 2  # codes, fp16 scales, 4-bit zeros
