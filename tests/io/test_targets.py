"""Engine limits, checked before any calibration (quantize --target) and on held weights (export --target)."""
from __future__ import annotations

import pytest
import torch
import transformers as t

from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.methods import Recipe


def llama(hidden=256, inter=512):
    torch.manual_seed(0)
    return t.LlamaForCausalLM(t.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=512)).eval()


@pytest.mark.parametrize("method, target, fmt", [
    ("rtn-int4-g128", "vllm", "compressed-tensors"), ("awq-uint4-g128", "vllm", "compressed-tensors"),
    ("gptq-int8", "vllm", "compressed-tensors"), ("w8a8", "vllm", "compressed-tensors"),
    ("q4_k_m", "llama.cpp", "gguf"), ("rtn-int4-g32", "llama.cpp", "gguf"), ("nf4", "transformers", "bnb"),
    ("rtn-int4-g128", "transformers", "compressed-tensors"), ("rtn-nvfp4", "vllm", "compressed-tensors"),
    ("gptq-mxfp4", "vllm", "compressed-tensors"), ("rtn-mxfp8_e4m3", "vllm", "compressed-tensors"),
    ("rtn-nvfp4-a4", "vllm", "compressed-tensors"), ("gptq-mxfp4-a4", "vllm", "compressed-tensors"),
    ("rtn-mxfp8_e4m3-a8", "vllm", "compressed-tensors"), ("aqlm", "transformers", "aqlm"),
    ("aqlm-1x16", "transformers", "aqlm")])
def test_what_an_engine_serves_passes(method, target, fmt):
    assert api.check_target(llama(), method, target) == fmt


@pytest.mark.parametrize("recipe, target, rule", [
    ("rtn-int3-g128", "vllm", "4 or 8 bits"),
    ("rtn-int4-g16", "vllm", "group size -1"),
    (Recipe("rtn-int4-g128", overrides=[("*.k_proj", "rtn-int8")]), "vllm", "fuses these into one layer"),
    ("rtn-int4-g128", "llama.cpp", "GGUF holds"),
    ("awq-uint4-g128", "transformers", "symmetric grids"),
    ("q4_k_m", "vllm", "compressed-tensors holds"),
    ("rtn-mxfp6_e2m3", "vllm", "no scheme reads MXFP6"), ("rtn-mxfp6_e2m3-a6", "vllm", "no scheme reads MXFP6")])
def test_what_an_engine_cannot_serve_is_refused_with_the_rule(recipe, target, rule):
    with pytest.raises(LowbitError) as e:
        api.check_target(llama(), recipe, target)
    lines = str(e.value).splitlines()
    assert lines[0].startswith(f"{target} cannot serve") and any(rule in line for line in lines[1:])
    assert all("[" in line or "holds" in line or "... and" in line for line in lines[1:])   # each names its source


def test_kernel_shapes_and_families():
    with pytest.raises(LowbitError, match="multiple of 64 and in_features of 128"):
        api.check_target(llama(hidden=96, inter=192), "rtn-int4-g32", "vllm")
    gpt2 = t.GPT2LMHeadModel(t.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=512)).eval()
    with pytest.raises(LowbitError, match="'gpt2' architecture"):
        api.check_target(gpt2, "ggml-q8_0", "llama.cpp")


def test_quantize_refuses_before_calibrating(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import lowbit.pipeline.runner as runner

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(runner, "capture_block_inputs", no_calibration)
    rc = main(["quantize", str(tiny_model_dir("llama")), "--method", "rtn-int3-g32", "--target", "vllm",
               "-o", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc == 2 and "vllm cannot serve" in err and "4 or 8 bits" in err and not (tmp_path / "q").exists()
    assert "Traceback" not in err


def test_export_checks_the_target_too(tmp_path, tiny_model_dir, capsys):
    src = tiny_model_dir("llama")
    assert main(["quantize", str(src), "--method", "rtn-int4-g32", "--quiet", "-o", str(tmp_path / "q")]) == 0
    rc = main(["export", str(tmp_path / "q"), "--format", "gptq", "--target", "vllm", "-o", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert rc == 2 and "multiple of 64 and in_features of 128" in err and not (tmp_path / "g").exists()
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "--target", "llama.cpp",
                 "-o", str(tmp_path / "m.gguf")]) == 0
