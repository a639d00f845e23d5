"""Every family lowbit lists (ARCHES) runs end to end with the pinned transformers (issue 11): quantise,
save, reload, export to every format, import back; where a family or format cannot be supported, the
step is a one-line refusal and nothing is half-done.

What each step is compared against:
- reload: the in-memory quantised model's outputs, bit for bit;
- import: the quantised model as the format stores it, built independently of the file: its float
  tensors (embeddings, norms, biases, float Linears) rounded to the dtype the format writes them in
  (GPTQ, AWQ and AQLM fp16, compressed-tensors bf16, bnb as held), its quantised weights untouched (the
  formats hold them exactly: tests/io/test_conformance.py). Same modules, same values: outputs equal
  bit for bit. GGUF also re-rounds what lowbit left in float (token_embd, output) by the file type's
  rules; the reference takes those two tensors as gguf-py dequantises them from the file, and the
  outputs agree to float32 accumulation order (1e-5 relative: the imported model multiplies ggml
  blocks where the reference multiplies integer groups of the same values).
"""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.io import EXPORTERS, IMPORTERS, load_format_modules, quantized_weights
from lowbit.methods.recipe import DEFAULT_SKIP, Recipe
from lowbit.pipeline.arch import ARCHES
from tests.conftest import build_tiny_model

load_format_modules()
FAMILIES = sorted(ARCHES)
FORMATS = sorted(EXPORTERS)
GEN = torch.Generator().manual_seed(11)
CALIB = torch.randint(0, 512, (2, 16), generator=GEN)
IDS = torch.randint(0, 512, (2, 24), generator=GEN)

# transformers 5 holds these families' experts as fused 3-D parameters, which lowbit does not quantise:
# quantising is refused in one line unless the experts are kept in full precision on purpose.
FUSED_EXPERTS = {"mixtral", "qwen2_moe"}
# int4 g32 is held exactly by gptq, awq, compressed-tensors and gguf; bnb holds NF4, aqlm AQLM's codebooks.
METHOD = {"bnb": "nf4", "aqlm": "aqlm-r0"}
FLOAT_DTYPE = {"gptq": torch.float16, "awq": torch.float16, "compressed-tensors": torch.bfloat16, "bnb": None,
               "aqlm": torch.float16}
# (family, format) -> words of the one-line refusal, where the family cannot be written in the format
REFUSED = {**{(f, "gguf"): f"GGUF export supports Llama-architecture models, not {f!r}" for f in FAMILIES if f != "llama"},
           ("gpt2", "compressed-tensors"): "Conv1D layers in transformers' gpt2",
           ("gpt2", "aqlm"): "Conv1D layer in transformers' gpt2"}


def outputs(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def recipe_for(family: str, method: str) -> Recipe:
    return Recipe(method, skip=DEFAULT_SKIP + (("*.mlp.experts",) if family in FUSED_EXPERTS else ()))


@pytest.fixture(scope="module")
def quantised(tmp_path_factory, tiny_tokenizer, one_thread):
    """(family, method) -> (the quantised model, the same reloaded from its native folder, the tokenizer)."""
    cache = {}

    def get(family: str, method: str = "rtn-int4-g32"):
        if (family, method) not in cache:
            model = build_tiny_model(family)
            api.quantize(model, recipe_for(family, method), calibration=CALIB, progress=False)
            folder = api.save(model, tmp_path_factory.mktemp(f"{family}-{method}") / "q", tokenizer=tiny_tokenizer)
            reloaded, tok = api.load(folder)
            cache[family, method] = model, reloaded, tok
        return cache[family, method]
    return get


def test_the_families_are_the_architecture_table():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "gemma", "gemma2", "phi3",
                             "gpt2", "opt", "bert", "roberta", "xlm-roberta"}


@pytest.mark.parametrize("family", sorted(FUSED_EXPERTS))
def test_fused_experts_are_refused_whole(family):
    model = build_tiny_model(family)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LowbitError) as e:
        api.quantize(model, "rtn-int4-g32", calibration=CALIB, progress=False)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{family}: the experts are fused")
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_quantise_save_reload(quantised, family):
    """Every Linear the recipe selects is quantised (none half-done), and the reloaded model computes
    exactly what the quantised one did."""
    from fnmatch import fnmatch

    model, reloaded, _ = quantised(family)
    recipe = recipe_for(family, "rtn-int4-g32")
    floats = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert all(any(fnmatch(n, p) for p in recipe.skip) for n, m in model.named_modules() if type(m) is torch.nn.Linear), floats
    held = quantized_weights(model)
    assert len(held) >= 4 * model.config.num_hidden_layers
    assert held.keys() == quantized_weights(reloaded).keys()
    assert torch.equal(outputs(reloaded), outputs(model))


def as_stored(model, dtype):
    """A copy of `model` whose float tensors outside the quantised weights (biases of quantised modules
    included) are rounded to `dtype`, as a format that writes them in `dtype` stores them."""
    out = copy.deepcopy(model)
    if dtype is None:
        return out
    held = {n for n, m in out.named_modules() if callable(getattr(m, "quantized", None))}
    with torch.no_grad():
        for key, x in out.state_dict(keep_vars=True).items():
            owner, _, leaf = key.rpartition(".")
            if x.is_floating_point() and (owner not in held or leaf == "bias"):
                x.data = x.data.to(dtype).to(x.dtype)
    return out


def gguf_reference(model, path):
    """`model` with token_embd and output as the GGUF file holds them, dequantised by gguf-py."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ref = copy.deepcopy(model)
    tensors = {x.name: x for x in GGUFReader(path).tensors}
    with torch.no_grad():
        for name, module in (("token_embd.weight", ref.get_input_embeddings()), ("output.weight", ref.lm_head)):
            if name in tensors:
                x = tensors[name]
                values = dequantize(np.asarray(x.data), x.tensor_type).reshape(module.weight.shape)
                module.weight.data = torch.from_numpy(np.ascontiguousarray(values)).float()
    return ref


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import(quantised, tmp_path, family, fmt):
    model, reloaded, tok = quantised(family, METHOD.get(fmt, "rtn-int4-g32"))
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    if (family, fmt) in REFUSED:
        with pytest.raises(LowbitError) as e:
            api.export(reloaded, out, format=fmt, tokenizer=tok)
        assert "\n" not in str(e.value) and REFUSED[family, fmt] in str(e.value)
        assert list(tmp_path.iterdir()) == []
        return
    api.export(reloaded, out, format=fmt, tokenizer=tok)
    back, _ = IMPORTERS[fmt](out)
    assert quantized_weights(back).keys() >= quantized_weights(model).keys()
    if fmt == "gguf":
        want = outputs(gguf_reference(model, out))
        torch.testing.assert_close(outputs(back), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    else:
        assert torch.equal(outputs(back), outputs(as_stored(model, FLOAT_DTYPE[fmt])))
