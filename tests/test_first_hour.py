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
