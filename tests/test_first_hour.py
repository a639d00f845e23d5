"""What a new user meets in the first hour: every format lowbit writes, lowbit reads back."""
from __future__ import annotations

import json

import pytest

from lowbit.cli import main
from tests.conftest import fp16_llama_folder


# sampling settings a model folder ships; loaders (transformers' generate, vLLM) read them from the folder
GENERATION = {"do_sample": True, "temperature": 0.3, "top_p": 0.85, "max_new_tokens": 77}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-hour")
    fp16_llama_folder(root / "hf")
    (root / "hf" / "generation_config.json").write_text(json.dumps(GENERATION))
    assert main(["quantize", str(root / "hf"), "--method", "rtn-int4-g32", "--quiet", "-o", str(root / "q")]) == 0
    return root


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_eval_reads_the_folders_lowbit_exports(quantized, tmp_path, capsys, fmt):
    out = tmp_path / fmt
    assert main(["export", str(quantized / "q"), "--format", fmt, "-o", str(out)]) == 0
    capsys.readouterr()
    rc = main(["eval", str(out), "--no-speed", "--max-eval-tokens", "64", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)["quantized_linears"] > 0


def test_generation_config_travels_with_the_model(quantized, tmp_path):
    """quantize (in memory or streamed) keeps the folder's sampling settings; export and import carry them on."""
    assert main(["export", str(quantized / "q"), "--format", "gptq", "--quiet", "-o", str(tmp_path / "gptq")]) == 0
    assert main(["import", str(tmp_path / "gptq"), "--format", "gptq", "--quiet", "-o", str(tmp_path / "back")]) == 0
    assert main(["quantize", str(quantized / "hf"), "--method", "rtn-int4-g32", "--stream", "--quiet",
                 "-o", str(tmp_path / "streamed")]) == 0
    for folder in (quantized / "q", tmp_path / "gptq", tmp_path / "back", tmp_path / "streamed"):
        kept = json.loads((folder / "generation_config.json").read_text())
        assert {k: kept.get(k) for k in GENERATION} == GENERATION, folder


def test_every_option_has_help_text():
    import argparse

    from lowbit.cli import build_parser

    def bare(parser, prefix):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from bare(sub, f"{prefix} {name}")
            elif not a.help and not isinstance(a, argparse._HelpAction):
                yield f"{prefix} {a.option_strings or a.dest}"

    assert list(bare(build_parser(), "lowbit")) == []


def test_quantize_help_names_the_methods(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("rtn", "gptq", "awq", "hqq", "nf4", "q4_k_m"))
