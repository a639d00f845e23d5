"""SmoothQuant: the smoothing factors, folding that leaves the model unchanged, and W8A8 on outliers."""
import copy

import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.methods import parse_method
from lowbit.methods.smoothquant import SmoothQuant, search_alpha, smoothed_error, smoothing_scales
from lowbit.nn.w8a8 import W8A8Linear
from lowbit.pipeline.arch import describe
from lowbit.methods.scaling import ScaleContext
from lowbit.methods.stats import LayerStats
from lowbit.pipeline.fold import input_source
from lowbit.pipeline.scaling import prepare_model
from lowbit.pipeline.outliers import make_outlier_variant
from tests.conftest import build_tiny_model

GEN = torch.Generator().manual_seed(0)
CALIB = torch.randint(0, 512, (8, 48), generator=GEN)
IDS = torch.randint(0, 512, (2, 48), generator=GEN)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def input_absmax(model, name):
    seen = []
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    logits(model)
    h.remove()
    return torch.cat(seen).abs().amax(0)


def test_smoothing_scales_closed_form():
    x = torch.tensor([4.0, 100.0, 0.0, 1.0])
    w = torch.tensor([0.25, 0.01, 0.3, 0.0])
    s = smoothing_scales(x, w, 0.5)
    # sqrt(4 / 0.25) = 4, sqrt(100 / 0.01) = 100; silent input or empty weight column: left alone
    assert torch.allclose(s, torch.tensor([4.0, 100.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(smoothing_scales(x, w, 1.0)[:2], torch.tensor([4.0, 100.0], dtype=torch.float64))
    assert torch.allclose(smoothing_scales(x, w, 0.0)[:2], 1 / w[:2].double())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("outliers", [False, True])
def test_folding_the_smoothing_leaves_full_precision_outputs_unchanged(arch, outliers):
    base = build_tiny_model(arch)
    if outliers:
        base = make_outlier_variant(base, channels=(3, 17, 40), factor=50.0)
    ref = logits(base)
    smoothed = prepare_model(copy.deepcopy(base), SmoothQuant(alpha=0.5), CALIB)
    assert float((logits(smoothed) - ref).abs().max() / ref.abs().max()) < 1e-4
    # and something was folded: the weights moved
    changed = [n for (n, p), (_, p0) in zip(smoothed.named_parameters(), base.named_parameters())
               if not torch.equal(p, p0)]
    assert any("q_proj" in n or "fc1" in n for n in changed)


def test_smoothing_flattens_the_outlier_channels():
    base = make_outlier_variant(build_tiny_model("llama"), channels=(3, 17, 40), factor=50.0)
    smoothed = prepare_model(copy.deepcopy(base), SmoothQuant(alpha=0.5), CALIB)
    name = "model.layers.1.self_attn.q_proj"
    before, after = input_absmax(base, name), input_absmax(smoothed, name)
    spread = lambda a: float(a.max() / a.median())  # noqa: E731
    assert spread(before) > 30
    assert spread(after) < spread(before) / 5


def test_alpha_search_is_no_worse_than_the_default_on_its_objective():
    base = make_outlier_variant(build_tiny_model("llama"), channels=(3, 17, 40), factor=50.0)
    block = base.model.layers[0]
    arch = describe(base)
    linears = [block.get_submodule(n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    rows = []
    h = linears[0].register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1])))
    logits(base)
    h.remove()
    x = torch.cat(rows)
    source = input_source(block, arch, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    weights = [m.weight.detach() for m in linears]
    ctx = ScaleContext(weights, LayerStats(64), source.index, source.width, source.kind)
    alpha, err = search_alpha(x, ctx, x.abs().amax(0), "token")
    w_max = torch.stack([m.weight.abs().amax(0) for m in linears]).amax(0)
    at_half = smoothed_error(x, weights, smoothing_scales(x.abs().amax(0), w_max, 0.5), "token", x.abs().amax(0))
    no_smoothing = smoothed_error(x, weights, torch.ones(64), "token", x.abs().amax(0))
    assert err <= at_half + 1e-12 and err < no_smoothing / 5
    assert 0 <= alpha <= 1


@pytest.mark.parametrize("name", ["smoothquant", "smoothquant-static"])
def test_smoothquant_w8a8_survives_outliers_that_break_plain_w8a8(name):
    base = make_outlier_variant(build_tiny_model("llama"), channels=(3, 17, 40), factor=50.0)
    ref = logits(base)
    plain = parse_method("w8a8-static" if name.endswith("static") else "w8a8")
    errors = {}
    for config in (parse_method(name), plain):
        model = api.quantize(copy.deepcopy(base), config, calibration=CALIB, progress=False)
        assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == 14
        errors[config.short_name()] = float((logits(model) - ref).norm() / ref.norm())
    assert errors[name] < errors[plain.short_name()] / 4


def test_names_and_checks():
    assert parse_method("smoothquant") == SmoothQuant()
    assert parse_method("smoothquant-a0.8-static") == SmoothQuant(activation="tensor", alpha=0.8)
    assert parse_method("smoothquant-search").alpha is None
    assert SmoothQuant(alpha=None, activation="tensor").short_name() == "smoothquant-search-static"
    with pytest.raises(LowbitError, match="alpha"):
        SmoothQuant(alpha=1.5)
    with pytest.raises(LowbitError, match="unrecognised"):
        parse_method("smoothquant-fast")
