"""Native save/load: bit-identical reload, no pickles, atomic writes."""
import json

import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.io.native import load, save
from lowbit.methods import RTN, method_from_dict
from lowbit.nn import QuantLinear
from tests.conftest import build_tiny_model


@pytest.mark.parametrize("arch,config", [("llama", RTN(bits=4, group_size=32)),
                                          ("gpt2", RTN(bits=3, group_size=32, symmetric=False)),
                                          ("opt", RTN(bits=8, group_size=None))])
def test_reload_gives_bit_identical_outputs(tmp_path, tiny_tokenizer, arch, config):
    model = build_tiny_model(arch)
    api.quantize(model, config, tokenizer=tiny_tokenizer, n_samples=2, seq_len=32, progress=False)
    out = save(model, tmp_path / "q", tokenizer=tiny_tokenizer)
    loaded, tok = load(out)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert tok is not None and tok("def f").input_ids == tiny_tokenizer("def f").input_ids
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "lowbit_config.json", "config.json", "quant_report.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    meta = json.loads((out / "lowbit_config.json").read_text())
    assert method_from_dict(meta["recipe"]["default"]) == config
    n_q = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_q == len(meta["modules"]) > 0


@pytest.mark.parametrize("method", ["hqq-int4-g32", "spqr-int3-g16-actorder", "quip-3bit", "aqlm-r1-steps5",
                                    "quip-ft3-ftlr0.003", "aqlm-r1-steps5-ft3-ftlr0.003", "quip-2.5bit",
                                    "quip-3.25bit-ft3-ftlr0.003"])
def test_other_weight_types_reload_bit_identical(tmp_path, tiny_tokenizer, method):
    from lowbit.io import quantized_weights

    model = build_tiny_model("llama")
    api.quantize(model, method, tokenizer=tiny_tokenizer, n_samples=4, seq_len=32, progress=False)
    loaded, _ = load(save(model, tmp_path / "q", tokenizer=tiny_tokenizer))
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    ours, theirs = quantized_weights(model), quantized_weights(loaded)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, w in ours.items():
        assert type(w) is type(theirs[name]) and torch.equal(w.dequantize(), theirs[name].dequantize())


def test_existing_output_is_refused_and_nothing_half_written(tmp_path, tiny_tokenizer):
    model = build_tiny_model("llama")
    api.quantize(model, RTN(bits=8, group_size=None), progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(LowbitError, match="already exists"):
        save(model, tmp_path / "taken")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_truncated_weights_are_a_clear_error(tmp_path):
    model = build_tiny_model("llama")
    api.quantize(model, RTN(bits=8, group_size=None), progress=False)
    out = save(model, tmp_path / "q")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match="not a valid safetensors file"):
        load(out)


def test_not_a_lowbit_folder(tmp_path):
    with pytest.raises(LowbitError, match="not a lowbit model folder"):
        load(tmp_path)


@pytest.mark.parametrize("recipe", [{"default": {"method": "no-such-method"}}, {"default": {"method": "rtn", "bits": 9}},
                                    {"overrides": 3}, ["not", "a", "dict"], {}, 0, "", []])
def test_a_bad_saved_recipe_is_an_error_naming_the_file(tmp_path, recipe):
    model = build_tiny_model("llama")
    api.quantize(model, RTN(bits=8, group_size=None), progress=False)
    out = save(model, tmp_path / "q")
    meta = json.loads((out / "lowbit_config.json").read_text())
    meta["recipe"] = recipe
    (out / "lowbit_config.json").write_text(json.dumps(meta))
    with pytest.raises(LowbitError, match=r"lowbit_config\.json: the saved recipe is (invalid|malformed)"):
        load(out)


def test_a_config_nested_too_deeply_is_an_error_not_a_recursion_traceback(tmp_path):
    model = build_tiny_model("llama")
    api.quantize(model, RTN(bits=8, group_size=None), progress=False)
    out = save(model, tmp_path / "q")
    text = (out / "lowbit_config.json").read_text()
    (out / "lowbit_config.json").write_text(text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(LowbitError, match="nested too deeply"):
        load(out)


def test_a_model_folder_config_nested_too_deeply_is_an_error(tmp_path, tiny_model_dir):
    import shutil

    from lowbit.pipeline.loading import read_config

    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), src)
    text = (src / "config.json").read_text().rstrip()
    (src / "config.json").write_text(text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(LowbitError, match="nested too deeply"):
        read_config(src)
    (src / "config.json").write_text(text)
    (src / "generation_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LowbitError, match="is not a JSON object"):
        read_config(src)
