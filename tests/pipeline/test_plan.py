"""`lowbit plan`: a run's needs from the config and shard headers alone, and quantize's refusal of a run
that cannot fit."""
from __future__ import annotations

import json

import pytest

import lowbit.pipeline.plan as plan_module
from lowbit.cli import main
from lowbit.pipeline.streaming import Shards
from tests.conftest import fp16_llama_folder


def test_plan_reads_no_weights_and_predicts_the_output_size(tmp_path, monkeypatch, capsys):
    src = fp16_llama_folder(tmp_path / "src")

    def no_reading(self, names):
        raise AssertionError("the planner read weights")

    monkeypatch.setattr(Shards, "read", no_reading)
    assert main(["plan", str(src), "--method", "rtn-int4-g32", "--json", "--no-probe"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["blocks"] == 2 and plan["seconds"] is None
    assert plan["weights_fp32_bytes"] == 4 * plan["parameters"]
    assert plan["base_bytes"] < min(plan["streamed_peak_bytes"], plan["in_memory_peak_bytes"])
    monkeypatch.undo()
    assert main(["quantize", str(src), "--method", "rtn-int4-g32", "--quiet", "-o", str(tmp_path / "q")]) == 0
    written = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert abs(written - plan["output_bytes"]) < 0.05 * written   # the header is the difference


def test_plan_prints_memory_disk_time_and_a_verdict(tmp_path, capsys):
    src = fp16_llama_folder(tmp_path / "src")
    assert main(["plan", str(src), "--method", "gptq", "--group-size", "32", "--samples", "4", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    for word in ("peak memory", "with --stream", "disk", "s per block", "verdict      fits in memory"):
        assert word in out


def test_quantize_refuses_a_run_that_cannot_fit(tmp_path, monkeypatch, capsys):
    src = fp16_llama_folder(tmp_path / "src")
    monkeypatch.setattr(plan_module, "available_memory", lambda: 2 ** 20)
    args = ["quantize", str(src), "--method", "rtn-int4-g32", "--quiet", "-o", str(tmp_path / "q")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "GiB of memory, 0.00 GiB are available" in err and "--ignore-memory" in err and not (tmp_path / "q").exists()
    assert main(args + ["--ignore-memory"]) == 0


@pytest.mark.parametrize("bad", [["--samples", "0"], ["--seq-len", "1"]])
def test_plan_refuses_bad_sizes(tmp_path, capsys, bad):
    src = fp16_llama_folder(tmp_path / "src")
    assert main(["plan", str(src), "--method", "rtn-int4-g32", "--no-probe", *bad]) == 2
    assert "at least" in capsys.readouterr().err
