"""Checks shared by the tests of methods with their own weight type and module."""
from __future__ import annotations

import pytest
import torch

from lowbit.nn import module_for


def check_module(q, module_class, n_in: int, n_out: int, slack_bits: int = 64):
    """The module nn/ picks for weight q runs it as the dense equivalent, gives q back, rebuilds from its
    layer_config and state_dict, and stores what q counts (plus an fp32 bias, within slack_bits)."""
    bias = torch.randn(n_out)
    m = module_for(q, bias)
    assert isinstance(m, module_class)
    x = torch.randn(3, 7, n_in)
    assert torch.allclose(m(x), torch.nn.functional.linear(x, q.dequantize(), bias), atol=1e-5)
    assert torch.equal(m.quantized().dequantize(), q.dequantize())
    rebuilt = module_class.from_layer_config(m.layer_config())
    rebuilt.load_state_dict(m.state_dict())
    assert torch.equal(rebuilt(x), m(x))
    assert m.storage_bytes() * 8 == pytest.approx(q.storage_bits + n_out * 32, abs=slack_bits)
