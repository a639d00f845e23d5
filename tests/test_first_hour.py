"""What a new user meets in the first hour: every format lowbit writes, lowbit reads back."""
from __future__ import annotations

import json

import pytest

from lowbit.cli import main
from tests.conftest import fp16_llama_folder


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-hour")
    fp16_llama_folder(root / "hf")
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
