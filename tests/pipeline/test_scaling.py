"""The scaling step runs for whichever Linears a scaling config is given: default or recipe override."""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit import api
from lowbit.io import quantized_weights
from lowbit.methods import AWQ, RTN, Recipe, SmoothQuant
from tests.conftest import build_tiny_model

CALIB = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))


def codes(model) -> dict[str, torch.Tensor]:
    return {n: w.dequantize() for n, w in quantized_weights(model).items()}


@pytest.mark.parametrize("config", [AWQ(group_size=32, n_grid=4), SmoothQuant(alpha=0.6)])
def test_an_override_scales_as_the_default_does(config):
    base = build_tiny_model("llama")
    as_default = api.quantize(copy.deepcopy(base), Recipe(config), calibration=CALIB, progress=False)
    as_override = api.quantize(copy.deepcopy(base), Recipe(RTN(bits=8), overrides=[("model.layers.*", config)]),
                               calibration=CALIB, progress=False)
    a, b = codes(as_default), codes(as_override)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # and the scales were really searched and folded: some norm differs from the unscaled model's
    norms = [n for n, _ in base.named_parameters() if "layernorm" in n]
    assert any(not torch.equal(as_override.get_parameter(n), base.get_parameter(n)) for n in norms)


def test_a_group_scales_with_its_own_config_only():
    base = build_tiny_model("llama")
    recipe = Recipe(RTN(bits=4, group_size=32), overrides=[("*.mlp.*", AWQ(group_size=32, n_grid=4))])
    model = api.quantize(copy.deepcopy(base), recipe, calibration=CALIB, progress=False)
    layer, ref = model.model.layers[0], base.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, ref.input_layernorm.weight)            # attention: RTN
    assert not torch.equal(layer.post_attention_layernorm.weight, ref.post_attention_layernorm.weight)  # MLP: AWQ
