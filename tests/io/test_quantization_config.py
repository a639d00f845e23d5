"""A folder's quantization_config describes exactly what is stored: the Linears a loader builds quantised,
read with transformers' own config classes and module-matching rules (and GPTQModel's `dynamic`
exclusions), are the Linears whose packed tensors the file holds. Before, a GPTQ export with a quantised
lm_head and float down_proj said `"lm_head": false` and named no exclusion: 3 of 15 Linears built wrong."""
from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file
from torch import nn

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.methods import RTN, Recipe
from lowbit.methods.nf4 import NF4
from tests.conftest import build_tiny_model

KEEP_EVERY_DOWN_PROJ = [("*.mlp.down_proj", None)]
KEEP_ONE_DOWN_PROJ = [("model.layers.0.mlp.down_proj", None)]


def quantized(config, overrides, head: bool):
    model = build_tiny_model("llama")
    api.quantize(model, Recipe(config, overrides=overrides, skip=() if head else ("lm_head",)), progress=False)
    return model


def linear_names() -> list[str]:
    return [n for n, m in build_tiny_model("llama").named_modules() if isinstance(m, nn.Linear)]


def stored_quantized(folder, marker: str) -> set[str]:
    return {k.split(marker)[0] for k in load_file(str(folder / "model.safetensors")) if marker in k}


def folder_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def gptq_built(qc: dict, monkeypatch) -> set[str]:
    """The Linears loaders build quantised: transformers' GPTQConfig (block_name_to_quantize,
    modules_in_block_to_quantize, optimum's suffix match), then GPTQModel's / vLLM's "-:" exclusions
    (re.match on the module name) and `lm_head`."""
    import importlib.metadata

    from transformers import GPTQConfig

    version = importlib.metadata.version   # GPTQConfig asks for optimum >= 1.15 when a selection is given
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.27.0" if name == "optimum" else version(name))
    config = GPTQConfig.from_dict(dict(qc))
    block = config.block_name_to_quantize or "model.layers"
    chosen = [m for group in config.modules_in_block_to_quantize or [] for m in group]
    excluded = [k[2:] for k in qc.get("dynamic") or {} if k.startswith("-:")]
    built = {n for n in linear_names() if n.startswith(block + ".")
             and (not chosen or any(n.endswith("." + m) for m in chosen))
             and not any(re.match(p, n) for p in excluded)}
    return built | ({"lm_head"} if qc.get("lm_head") else set())


def hf_built(qc_skip, add_default_skips: bool) -> set[str]:
    """The Linears transformers converts (AWQ, bitsandbytes): its own skip list and matching rule."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = build_tiny_model("llama")
    skip = HfQuantizer.get_modules_to_not_convert(model, qc_skip, model._keep_in_fp32_modules, add_default_skips)
    return {n for n in linear_names() if should_convert_module(n, skip)}


@pytest.mark.parametrize("overrides", [KEEP_EVERY_DOWN_PROJ, KEEP_ONE_DOWN_PROJ, []], ids=["every", "one", "none"])
def test_gptq_config_names_what_is_stored(overrides, tmp_path, monkeypatch):
    model = quantized(RTN(bits=4, group_size=32), overrides, head=True)
    out = api.export(model, tmp_path / "g", format="gptq")
    qc = folder_config(out)
    stored = stored_quantized(out, ".qweight")
    assert "lm_head" in stored and qc["lm_head"] is True
    assert len(stored) == 15 - {"every": 2, "one": 1, "none": 0}[
        "every" if overrides == KEEP_EVERY_DOWN_PROJ else "one" if overrides else "none"]
    assert gptq_built(qc, monkeypatch) == stored
    assert json.loads((out / "quantize_config.json").read_text()) == qc


@pytest.mark.parametrize("overrides", [KEEP_EVERY_DOWN_PROJ, []], ids=["down_proj", "none"])
def test_awq_config_names_what_is_stored(overrides, tmp_path):
    model = quantized(RTN(bits=4, group_size=32, symmetric=False), overrides, head=False)
    out = api.export(model, tmp_path / "a", format="awq")
    qc = folder_config(out)
    assert hf_built(qc["modules_to_not_convert"], add_default_skips=True) == stored_quantized(out, ".qweight")


def test_awq_refuses_a_quantised_output_head(tmp_path):
    """transformers and vLLM always build an AWQ model's lm_head in float: a stored lm_head.qweight would
    not load."""
    model = quantized(RTN(bits=4, group_size=32, symmetric=False), [], head=True)
    with pytest.raises(LowbitError, match=r"^lm_head: the AWQ layout keeps the output head in float"):
        api.export(model, tmp_path / "a", format="awq")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("head", [True, False], ids=["head", "no-head"])
def test_bnb_config_names_what_is_stored(head, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = quantized(NF4(compute_dtype="fp32"), [] if head else KEEP_EVERY_DOWN_PROJ, head=head)
    out = api.export(model, tmp_path / "b", format="bnb")
    qc = folder_config(out)
    stored = stored_quantized(out, ".weight.quant_state.")
    assert ("lm_head" in stored) == head
    assert hf_built(qc["llm_int8_skip_modules"], add_default_skips=False) == stored


@pytest.mark.parametrize("overrides", [KEEP_ONE_DOWN_PROJ, []], ids=["one", "none"])
def test_compressed_tensors_config_names_what_is_stored(overrides, tmp_path):
    """compressed-tensors' own matching of each config group's targets against `ignore`."""
    match = pytest.importorskip("compressed_tensors.utils.match")
    model = quantized(RTN(bits=4, group_size=32), overrides, head=True)
    out = api.export(model, tmp_path / "c", format="compressed-tensors")
    qc = folder_config(out)
    targets = [t for group in qc["config_groups"].values() for t in group["targets"]]
    built = {n for n, _ in match.match_named_modules(build_tiny_model("llama"), targets, qc["ignore"])}
    assert "lm_head" in built and built == stored_quantized(out, ".weight_scale")
