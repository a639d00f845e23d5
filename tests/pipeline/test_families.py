"""Conformance over every family of the architecture table: folds are exact algebra on every family,
with norm weights that look trained (the default all-ones norms hide a fold into the wrong norm)."""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit.methods import AWQ, SmoothQuant
from lowbit.pipeline.arch import ARCHES
from lowbit.pipeline.scaling import prepare_model
from tests.conftest import ENCODERS, build_tiny_model

GEN = torch.Generator().manual_seed(0)
CALIB = torch.randint(0, 512, (4, 32), generator=GEN)
IDS = torch.randint(0, 512, (2, 32), generator=GEN)
FAMILIES = sorted(ARCHES)


def randomised_model(family: str, seed: int = 3):
    """A tiny model of the family whose norm weights are 1 + N(0, 0.3) as they act (Gemma's RMSNorm adds
    the 1 itself) and whose norm biases are N(0, 0.1)."""
    model = build_tiny_model(family)
    offset = ARCHES[family].norm_offset
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "norm" not in type(module).__name__.lower() or getattr(module, "weight", None) is None:
                continue
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.3 + (1.0 - offset))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model


def outputs(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_every_family_has_a_tiny_model():
    for family in FAMILIES:
        assert build_tiny_model(family).config.model_type == family


@pytest.mark.parametrize("config", [SmoothQuant(alpha=0.5), AWQ(group_size=32, n_grid=2, clip=False)],
                         ids=["smoothquant", "awq-g32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_scale_search_and_fold_leave_the_model_unchanged(family, config):
    """Scale search and fold only, no rounding: exact algebra, so the outputs move by float rounding only
    (~1e-7 relative). A Gemma-2 whose MLP scales went into post_attention_layernorm (which normalises the
    attention *output* there) moved by 1.26 (SmoothQuant) and 0.13 (AWQ g32) relative."""
    base = randomised_model(family)
    ref = outputs(base)
    folded = prepare_model(copy.deepcopy(base), config, CALIB)
    assert float((outputs(folded) - ref).abs().max() / ref.abs().max()) < 1e-5
    moved = [n for (n, p), (_, p0) in zip(folded.named_parameters(), base.named_parameters()) if not torch.equal(p, p0)]
    if family in ENCODERS:      # post-norm: no norm feeds a Linear, nothing to fold
        assert not moved
    else:                       # something was folded
        assert moved
