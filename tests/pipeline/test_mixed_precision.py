"""Sensitivity and budgeted mixed precision, against direct computations on a tiny Llama."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.methods import parse_method
from lowbit.methods.stats import LayerStats
from lowbit.pipeline.budget import plan_budget
from lowbit.pipeline.sensitivity import rank_correlation, sensitivity
from tests.eval.helpers import tiny_llama

CANDIDATES = "rtn-int2-g32,rtn-int4-g32,rtn-int8"


@pytest.fixture(scope="module")
def measured(one_thread):
    model = tiny_llama(hidden=64, vocab=512)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, ids, sensitivity(model, CANDIDATES, ids, batch_size=3, progress=False)


def direct_kl_and_proxy(model, ids, name, method):
    """KL(p_fp || p_q) with only `name` rounded, by a separate copy and F.kl_div; and ||dW X^T||^2 / tokens."""
    inputs = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda m, i, o: inputs.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=ids).logits, -1)
    handle.remove()
    config, stats = parse_method(method), None
    if config.alone:               # QuIP# and AQLM: their own method, on this layer's fp inputs
        stats = LayerStats(module.in_features)
        for x in inputs:
            stats.update(x)
    other = copy.deepcopy(model)
    target = dict(other.named_modules())[name]
    with torch.no_grad():
        w = target.weight.clone()
        target.weight.copy_(config.quantize_weight(w, stats).dequantize())
        lp = F.log_softmax(other(input_ids=ids).logits, -1)
        dw = (target.weight - w).double()
    kl = F.kl_div(lp.reshape(-1, lp.shape[-1]), ref.reshape(-1, ref.shape[-1]), log_target=True,
                  reduction="batchmean")
    x = torch.cat(inputs).double()
    return float(kl), float(((dw @ x.T) ** 2).sum()) / x.shape[0]


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"])
def test_sensitivity_is_the_kl_of_rounding_one_layer_alone(measured, name):
    model, ids, layers = measured
    row = next(layer for layer in layers if layer.name == name)
    for j, method in enumerate(CANDIDATES.split(",")):
        kl, proxy = direct_kl_and_proxy(model, ids, name, method)
        assert row.kl[j] == pytest.approx(kl, rel=1e-4, abs=1e-9)
        assert row.proxy[j] == pytest.approx(proxy, rel=1e-6)
        assert row.bytes[j] == parse_method(method).quantize_weight(
            dict(model.named_modules())[name].weight.detach(), None).nbytes
    assert row.kl[0] > row.kl[1] > row.kl[2]          # fewer bits, more damage


def test_quip_is_measured_with_its_own_method_and_gptq_by_rounding_to_nearest(one_thread):
    """A candidate without a scheme (QuIP#'s lattice) is measured by QuIP# itself on the layer's own fp
    inputs; GPTQ by round-to-nearest on its scheme (pipeline/sensitivity.py says why)."""
    model = tiny_llama(hidden=64, vocab=512)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    layers = sensitivity(model, "quip-4bit,gptq-int2-g32", ids, batch_size=3, progress=False)
    for name in ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]:
        row = next(layer for layer in layers if layer.name == name)
        for j, method in enumerate(["quip-4bit", "rtn-int2-g32"]):
            kl, proxy = direct_kl_and_proxy(model, ids, name, method)
            assert row.kl[j] == pytest.approx(kl, rel=1e-3, abs=1e-9)
            assert row.proxy[j] == pytest.approx(proxy, rel=1e-3)
        assert row.kl[0] < row.kl[1]


def test_the_plan_is_the_best_mix_within_the_budget(measured):
    model, _, layers = measured
    numel = sum(layer.numel for layer in layers)
    losses = []
    for bpw in (3.0, 3.5, 4.5, 6.0):
        plan = plan_budget(layers, CANDIDATES, f"{bpw}bpw", model)
        assert plan.bits_per_weight <= bpw and plan.allocation.size <= bpw * numel / 8
        chosen = {name: cfg.short_name() for name, cfg in plan.recipe.overrides}
        assert set(chosen) == {layer.name for layer in layers}
        assert plan.allocation.loss == pytest.approx(sum(r[3] for r in plan.rows))
        losses.append(plan.allocation.loss)
    assert losses == sorted(losses, reverse=True)       # more room never predicts more loss
    # a uniform choice is one of the mixes the knapsack weighs, so the mix predicts no more loss than it
    uniform4 = sum(layer.kl[1] for layer in layers)
    assert plan_budget(layers, CANDIDATES, "4.5bpw", model).allocation.loss <= uniform4 + 1e-12
    with pytest.raises(LowbitError, match="below the smallest mix"):
        plan_budget(layers, CANDIDATES, "2bpw", model)
    with pytest.raises(LowbitError, match="cannot read a budget"):
        plan_budget(layers, CANDIDATES, "lots", model)


def test_a_budget_in_bytes_counts_the_rest_of_the_model_at_fp16(measured):
    from lowbit.pipeline.budget import linear_budget

    model, _, layers = measured
    rest = 2 * (sum(p.numel() for p in model.parameters()) - sum(layer.numel for layer in layers))
    numel = sum(layer.numel for layer in layers)
    assert linear_budget(f"{rest + 1000}", model, numel) == 1000
    assert linear_budget("1MB", model, numel) == 10 ** 6 - rest
    assert linear_budget("4bpw", model, numel) == numel // 2
    with pytest.raises(LowbitError, match="leaves nothing"):
        linear_budget("1000", model, numel)


def test_rank_correlation_closed_forms():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share ranks: x ranks (0.5, 0.5, 2, 3), y ranks (0, 1, 2, 3)
    assert rank_correlation([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


def quantize_with_budget(tmp_path, method, budget, candidates, out="out", extra=()):
    """`lowbit quantize` of a tiny fp16 Llama folder with --budget: (exit code, the saved model or None)."""
    from lowbit import api
    from lowbit.cli import main
    from tests.conftest import fp16_llama_folder

    if not (tmp_path / "hf").exists():
        fp16_llama_folder(tmp_path / "hf")
    argv = ["quantize", str(tmp_path / "hf"), "--method", method, "--budget", budget,
            *(["--candidates", candidates] if candidates else []), "--samples", "4", "--quiet", "-o",
            str(tmp_path / out), *extra]
    code = main(argv)
    return code, (api.load_model(tmp_path / out)[0] if code == 0 else None)


def test_quantize_with_a_budget_saves_the_mix(tmp_path, capsys):
    from lowbit.eval.memory import model_memory

    code, model = quantize_with_budget(tmp_path, "rtn", "4bpw", "rtn-int2-g32,rtn-int4-g32")
    assert code == 0 and "mixed precision: " in capsys.readouterr().out
    mem = model_memory(model)
    assert mem.quantized_linears == 14 and 3.5 < mem.bits_per_weight <= 4.0     # both schemes used, within budget
    # --skip keeps a Linear in full precision and outside the budget
    code, model = quantize_with_budget(tmp_path, "rtn", "4bpw", "rtn-int2-g32,rtn-int4-g32", "skipped",
                                       ["--skip", "*.0.mlp.down_proj"])
    assert code == 0
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear and model_memory(model).quantized_linears == 13


def test_a_budget_measures_on_the_windows_asked_for(tmp_path, monkeypatch):
    """--samples and --seq-len shape the sensitivity windows too (sentence-sized windows measured better
    mixes for an encoder of sentences, README)."""
    import lowbit.pipeline.budget as budget

    shapes = []

    def measured(model, candidates, ids, **kw):
        shapes.append(tuple(ids.shape))
        raise LowbitError("stop after the windows")

    monkeypatch.setattr(budget, "sensitivity", measured)
    assert quantize_with_budget(tmp_path, "rtn", "4bpw", "rtn-int2-g32,rtn-int4-g32",
                                extra=["--seq-len", "12"])[0] == 2
    assert shapes == [(4, 12)]


def test_a_budget_mixes_families_gptq_and_quip(tmp_path, capsys):
    """Candidates of two calibrated methods: each Linear gets GPTQ's or QuIP#'s weight, the model saves and
    loads back with both, and its size is within the budget."""
    from lowbit.eval.memory import model_memory
    from lowbit.nn.quip import QuipLinear

    code, model = quantize_with_budget(tmp_path, "gptq", "3.8bpw", "gptq-int3-g32,quip-4bit")
    assert code == 0 and "quip-4bit x" in capsys.readouterr().out
    kinds = {type(m).__name__ for m in model.modules()}
    assert "QuipLinear" in kinds and "QuantLinear" in kinds
    assert sum(isinstance(m, QuipLinear) for m in model.modules()) < 14
    mem = model_memory(model)
    assert mem.quantized_linears == 14 and 3.5 < mem.bits_per_weight <= 3.8


def test_quip_mixes_its_own_rates_by_default(tmp_path, capsys):
    """`--method quip --budget` without --candidates mixes QuIP#'s rates from 2 to 4 bits, fractional ones
    among them (bits allocated across Linears and across each one's 8-column blocks), within the budget."""
    from lowbit.eval.memory import model_memory
    from lowbit.methods.quip import QuIP
    from lowbit.nn.quip import QuipLinear
    from lowbit.pipeline.budget import default_candidates

    assert default_candidates("quip") == list(QuIP.budget_candidates)
    code, model = quantize_with_budget(tmp_path, "quip", "3.4bpw", None)
    out = capsys.readouterr().out
    assert code == 0 and "mixed precision: " in out
    layers = [m for m in model.modules() if isinstance(m, QuipLinear)]
    assert len(layers) == 14 and any(m.finer_blocks for m in layers)
    assert 3.0 < model_memory(model).bits_per_weight <= 3.4


def test_a_budget_is_refused_before_any_measurement(tmp_path, capsys):
    from lowbit.cli import main
    from tests.conftest import fp16_llama_folder

    fp16_llama_folder(tmp_path / "hf")
    base = ["quantize", str(tmp_path / "hf"), "--method", "rtn", "--candidates", "rtn-int2-g32,rtn-int4-g32",
            "--quiet", "-o", str(tmp_path / "out")]
    assert main(base + ["--budget", "abc"]) == 2
    assert main(base + ["--budget", "1bpw"]) == 2
    err = capsys.readouterr().err
    assert "cannot read a budget" in err and "below the smallest mix" in err and "2.500 bits" in err
    # LLM.int8() has no scheme to round and is not measured one Linear at a time
    unmeasurable = base[:5] + ["llm-int8,rtn-int4-g32"] + base[6:]
    assert main(unmeasurable + ["--budget", "6bpw"]) == 2
    assert "llm-int8 has no scheme to round to nearest" in capsys.readouterr().err
    # a bare number counts bytes: the error says how bits per weight are written
    assert main(base + ["--budget", "3.5"]) == 2
    assert "a bare number counts bytes; bits per weight are written 3.5bpw" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_budget_above_every_candidate_is_noted(measured):
    """A budget that holds each Linear's largest candidate leaves nothing to allocate: said before the
    measurement (which still picks the least-loss candidate of each Linear)."""
    from lowbit.pipeline.budget import check_budget, parse_budget

    model, _, layers = measured
    int8 = 8 * sum(layer.bytes[2] for layer in layers) / sum(layer.numel for layer in layers)   # rtn-int8's size
    assert f"holds the largest candidate of every Linear ({int8:.3f} bits" in check_budget(model, CANDIDATES, "20bpw")
    assert check_budget(model, CANDIDATES, "3bpw") is None
    assert parse_budget("1TB") == ("bytes", 1e12) and parse_budget("2TiB") == ("bytes", 2 * 2 ** 40)


def test_an_encoder_is_measured_by_embedding_cosine(one_thread):
    from tests.conftest import build_tiny_model

    model = build_tiny_model("bert")
    ids = torch.randint(5, 500, (3, 16), generator=torch.Generator().manual_seed(1))
    layers = sensitivity(model, "rtn-int2-g32,rtn-int8", ids, progress=False)
    name = layers[3].name
    other = copy.deepcopy(model)
    target = dict(other.named_modules())[name]
    with torch.no_grad():
        target.weight.copy_(parse_method("rtn-int2-g32").quantize_weight(target.weight.clone(), None).dequantize())
        ref, out = (m(input_ids=ids).last_hidden_state.mean(1) for m in (model, other))
    assert layers[3].kl[0] == pytest.approx(float(1 - F.cosine_similarity(ref, out).mean()), rel=1e-4, abs=1e-7)
    assert len(layers) == 13 and layers[3].kl[0] > layers[3].kl[1]     # 2 x 6 in the blocks and the pooler
