"""W8A8-FP8: FP8Linear's output equals a float64 reference over the same quantised values, with both
backends (torch._scaled_mm where the build has it, the fp32 emulation), and its codes are torch's."""
from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods import parse_method
from lowbit.nn import FP8Linear, module_for
from lowbit.nn.fp8 import BACKENDS, quantize_input, scaled_mm_available
from lowbit.weights import FP8ActWeight


def reference(m: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """The same FP8 values (weight codes, activation codes and scales), multiplied in float64."""
    xq, sx = quantize_input(x.reshape(-1, m.in_features), m.input_scale)
    w = m.weight.double() * m.weight_scale.double().reshape(-1, 1)
    y = (xq.double() * sx.double()) @ w.T
    return (y if m.bias is None else y + m.bias.double()).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("name", ["rtn-fp8_e4m3-a8dyn", "rtn-fp8_e4m3-tensor-a8dyn", "rtn-fp8_e5m2-a8dyn"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_linear_equals_the_float_reference_of_its_quantised_values(name, backend):
    if backend == "scaled_mm" and (not scaled_mm_available() or "e5m2" in name):
        pytest.skip("torch._scaled_mm does not run this here")
    torch.manual_seed(0)
    w, x = torch.randn(48, 96) * 0.05, torch.randn(2, 7, 96) * 3
    m = module_for(parse_method(name).quantize_weight(w), torch.randn(48))
    m.backend = backend
    torch.testing.assert_close(m(x).double(), reference(m, x), rtol=2e-6, atol=2e-6)


def test_static_activations_use_the_calibrated_scale_and_saturate():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    q = parse_method("rtn-fp8_e4m3-tensor").quantize_weight(w)
    m = module_for(FP8ActWeight(q, "tensor", 0.01))
    x = torch.randn(4, 32)
    x[0, 0] = 100.0                                          # 100 / 0.01 = 10^4: saturates at 448
    xq, sx = quantize_input(x, m.input_scale)
    assert float(xq[0, 0].float()) == 448.0 and torch.all(sx == 0.01)
    m.backend = "emulated"
    torch.testing.assert_close(m(x).double(), reference(m, x), rtol=2e-6, atol=2e-6)


def test_weight_codes_are_torchs_float8_cast():
    w = torch.randn(32, 64)
    q = parse_method("rtn-fp8_e4m3-a8dyn").quantize_weight(w).weight
    assert torch.equal(q.codes, (w / q.scale).to(torch.float8_e4m3fn).view(torch.uint8))


def test_module_gives_back_its_weight_and_refuses_non_fp8():
    w = torch.randn(8, 32)
    held = module_for(parse_method("rtn-fp8_e4m3-a8dyn").quantize_weight(w)).quantized()
    assert isinstance(held, FP8ActWeight) and held.activation == "token"
    with pytest.raises(LowbitError):
        parse_method("rtn-int8-a8dyn")
    with pytest.raises(LowbitError):
        parse_method("rtn-fp8_e4m3-tensor-a8static").quantize_weight(w, None)
