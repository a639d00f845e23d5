"""The block-by-block pipeline on tiny random models of several architectures."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lowbit import api
from lowbit.methods import RTN
from lowbit.methods.base import MethodConfig
from lowbit.core import QuantSpec
from lowbit.methods.rtn import rtn_quantize
from lowbit.nn import QuantLinear
from lowbit.pipeline.arch import block_list, describe
from lowbit.pipeline.loading import conv1d_to_linear
from tests.conftest import build_tiny_model


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def block_linear_names(model):
    conv1d_to_linear(model)  # GPT-2's Conv1D: the pipeline swaps these for nn.Linear too
    path, blocks = block_list(model, describe(model))
    return {f"{path}.{i}.{n}" for i, b in enumerate(blocks) for n, m in b.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "opt", "bert"])
def test_int8_per_channel_quantises_every_block_linear(arch, tiny_tokenizer):
    model = build_tiny_model(arch)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    ref = logits(model, ids)
    targets = block_linear_names(model)
    api.quantize(model, RTN(bits=8, group_size=None), tokenizer=tiny_tokenizer, n_samples=4, seq_len=64, progress=False)
    quantised = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(targets) >= 8 and targets <= quantised
    out = logits(model, ids)
    # int8 per-channel: weight error ~ 0.3% of each row; logits move by about as much
    assert float((out - ref).norm() / ref.norm()) < 0.03
    assert all(r.n_tokens == 4 * 64 for r in model.lowbit_report if r.name in targets)


def test_report_output_error_matches_direct_computation():
    """Block 0 of a non-sequential method sees the original model's activations: compute the error directly."""
    target = "model.layers.0.mlp.down_proj"
    calib = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(2))
    original = build_tiny_model("llama")
    seen = []
    h = original.get_submodule(target).register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        original(input_ids=calib)
    h.remove()
    x = torch.cat(seen)
    w = original.get_submodule(target).weight.detach()
    q = rtn_quantize(w, QuantSpec("int4", "group", 32)).dequantize()
    direct = float((x @ (w - q).T).norm() / (x @ w.T).norm())
    model = build_tiny_model("llama")
    api.quantize(model, RTN(bits=4, group_size=32), calibration=calib, progress=False)
    reported = next(r for r in model.lowbit_report if r.name == target).relative_error
    assert reported == pytest.approx(direct, rel=1e-4)


@dataclass(frozen=True)
class RecordingRTN(MethodConfig):
    """RTN that records the order in which the pipeline hands it layers (test-only)."""
    name = "recording-rtn"
    sequential = True
    required_stats = ("hessian",)
    log: list = None

    def quantize_weight(self, weight, stats):
        self.log.append(stats)
        return rtn_quantize(weight, QuantSpec("int4", "group", 32))


def test_sequential_groups_follow_the_block_order(tiny_tokenizer):
    model = build_tiny_model("llama")
    log = []
    api.quantize(model, RecordingRTN(log=log), tokenizer=tiny_tokenizer, n_samples=2, seq_len=32, progress=False)
    names = [r.name.split("layers.0.")[-1] for r in model.lowbit_report if "layers.0." in r.name]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    # q, k and v share one input: their statistics are identical (one pass), o's differ
    assert torch.equal(log[0].xtx, log[2].xtx) and not torch.equal(log[0].xtx, log[3].xtx)


def test_skip_list_and_overrides(tiny_tokenizer):
    from lowbit.methods.recipe import Recipe

    model = build_tiny_model("llama")
    recipe = Recipe(RTN(bits=4, group_size=32), overrides=[("*.mlp.down_proj", RTN(bits=8, group_size=None)),
                                                           ("*.self_attn.k_proj", None)])
    api.quantize(model, recipe, tokenizer=tiny_tokenizer, n_samples=2, seq_len=32, progress=False)
    mods = dict(model.named_modules())
    assert type(mods["lm_head"]) is nn.Linear and type(mods["model.layers.0.self_attn.k_proj"]) is nn.Linear
    assert mods["model.layers.0.mlp.down_proj"].spec.bits == 8 and mods["model.layers.0.mlp.up_proj"].spec.bits == 4


def test_int4_g128_footprint_is_about_a_quarter_of_fp16():
    import transformers as t

    torch.manual_seed(0)
    model = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    api.quantize(model, RTN(bits=4, group_size=128), progress=False)
    qlin = [m for m in model.modules() if isinstance(m, QuantLinear)]
    held = sum(m.storage_bytes() for m in qlin)
    fp16 = sum(2 * m.in_features * m.out_features for m in qlin)
    assert held / fp16 == pytest.approx(4.125 / 16)
    assert held / fp16 <= 0.27


@pytest.mark.parametrize("method", ["gptq-int4-g128", "awq-int4-g128", "rtn-int4-g128", "hqq-int4-g128"])
def test_a_group_size_that_does_not_divide_a_layer_is_refused_before_any_work(method, monkeypatch):
    """Llama with hidden 128 and intermediate 192 at g128: both down_proj (192 input columns) are named with
    their width, with a skip pattern and a group size that divides (64); nothing is calibrated and the
    caller's model is untouched (it used to fail after calibration, at down_proj, with 6 Linears swapped)."""
    import transformers as t

    from lowbit.errors import LowbitError
    from lowbit.pipeline import runner

    torch.manual_seed(0)
    model = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=512))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    monkeypatch.setattr(runner, "capture_block_inputs", lambda *a: pytest.fail("calibration ran"))
    with pytest.raises(LowbitError) as e:
        api.quantize(model, method, calibration=torch.zeros(2, 8, dtype=torch.long), progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert "group size 128 does not divide the row length 192" in message
    assert "in model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj;" in message
    assert message.count("model.layers.") == 2      # only the offending Linears are named
    assert "--skip *.mlp.down_proj" in message and "such as 64" in message
    assert all(type(m) is not QuantLinear for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
