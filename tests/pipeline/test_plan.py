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


def test_plan_counts_what_fine_tuning_keeps(tmp_path):
    """Tuned runs keep the full-precision hidden states and targets (and journal the references): more working
    memory and disk than the same method untuned; end-to-end tuning adds a batch's graph through every block."""
    src = fp16_llama_folder(tmp_path / "src")
    plain, tuned, e2e = (plan_module.plan_folder(src, m, samples=32, seq_len=32, probe=False)
                         for m in ("quip", "quip-ft2", "quip-ft2-e2e2"))
    hidden = 32 * 32 * 64 * 4   # tokens x hidden x float32
    assert tuned.disk_bytes - plain.disk_bytes == 2 * hidden
    streamed, in_memory = (lambda p: p.streamed_peak_bytes - p.base_bytes), (lambda p: p.in_memory_peak_bytes - p.base_bytes)
    # (base_bytes, the process's own resident size, moves between calls; here the embedding's phase is the peak)
    assert streamed(tuned) >= streamed(plain)
    assert plan_module._working_bytes(*tuned_args(src, "quip-ft2")) > plan_module._working_bytes(*tuned_args(src, "quip"))
    assert in_memory(e2e) > in_memory(tuned) >= in_memory(plain)


def tuned_args(src, method):
    from lowbit.methods.recipe import as_recipe
    from lowbit.pipeline.streaming import skeleton

    model, _ = skeleton(src)
    return model, plan_module._linears(model, as_recipe(method)), 32 * 32, 32, True


def test_plan_says_end_to_end_tuning_cannot_stream(tmp_path, capsys):
    src = fp16_llama_folder(tmp_path / "src")
    assert main(["plan", str(src), "--method", "quip-ft2-e2e2", "--stream", "--no-probe", "--samples", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "e2e" in err and "\n" not in err
    assert main(["plan", str(src), "--method", "quip-ft2-e2e2", "--no-probe", "--samples", "4"]) == 0
    assert "no --stream run (end-to-end tuning, e2e, cannot stream)" in capsys.readouterr().out
