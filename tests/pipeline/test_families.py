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


def block_inputs_against_hidden_states(model, ids) -> list[float]:
    """Max |captured block input - the model's own hidden state| at each block, walking the blocks as
    the pipeline does (each block's output is the next block's input)."""
    from lowbit.pipeline.arch import block_list, describe
    from lowbit.pipeline.blocks import advance, capture_block_inputs

    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    _, blocks = block_list(model, describe(model))
    inputs = capture_block_inputs(model, blocks, [ids])
    diffs = []
    for i, block in enumerate(blocks):
        diffs.append(float((inputs[0].hidden - states[i]).abs().max()))
        advance(block, inputs)
    return diffs


@pytest.mark.parametrize("family", FAMILIES)
def test_block_inputs_are_the_models_own_hidden_states(family):
    model = randomised_model(family)
    assert block_inputs_against_hidden_states(model, IDS) == [0.0] * model.config.num_hidden_layers


def test_every_block_gets_its_own_attention_mask():
    """Gemma-2 with layers sliding, full, sliding and a window of 4 over 32 tokens: replaying block 0's
    (sliding) mask into block 1 moved block 2's input by 5.0. Each block now gets the mask the model
    gives it."""
    import transformers as t

    from tests.conftest import tiny_config

    config = tiny_config("gemma2")
    config.num_hidden_layers, config.sliding_window = 3, 4
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = t.Gemma2ForCausalLM(config).eval()
    assert block_inputs_against_hidden_states(model, IDS) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_experts_are_refused_in_one_line_not_left_in_float(family):
    """transformers 5 holds the experts as fused 3-D parameters, not Linears: quantising only the Linears
    left 88.9% of a Mixtral block's weights in float, silently. Refused in one line naming the family,
    before any work, unless the experts are kept in full precision on purpose."""
    from lowbit import api
    from lowbit.errors import LowbitError
    from lowbit.methods import RTN, Recipe

    model = build_tiny_model(family)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(LowbitError) as e:
        api.quantize(model, "rtn-int4-g32", calibration=CALIB, progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{family}: the experts are fused 3-D parameters")
    assert "--skip '*.mlp.experts'" in message
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    recipe = Recipe(RTN(bits=4, group_size=32), skip=("lm_head", "*.mlp.experts"))
    api.quantize(model, recipe, calibration=CALIB, progress=False)
    assert "model.layers.1.self_attn.q_proj" in {r.name for r in model.lowbit_report}
    assert torch.equal(model.model.layers[1].mlp.experts.down_proj, before["model.layers.1.mlp.experts.down_proj"])
