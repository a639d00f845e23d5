"""Streaming from shards (`lowbit quantize --stream`, api.quantize_folder): the folder written one block at
a time equals, byte for byte, the in-memory run's save of the same model; an interrupted run resumes to
the same bytes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.io.journal import work_folder
from lowbit.methods.recipe import Recipe
from tests.conftest import build_tiny_model, fp16_llama_folder, tiny_config

IDS = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))


def same_folders(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def in_memory(src: Path, method, out: Path, calibration=IDS) -> Path:
    model, tokenizer = api.load_model(src)
    api.quantize(model, method, calibration=calibration, progress=False)
    return api.save(model, out, tokenizer=tokenizer)


@pytest.mark.parametrize("method", ["rtn-int4-g32", "gptq-int4-g32", "awq-int4-g32"])
def test_streamed_folder_equals_in_memory_save(tmp_path, method):
    torch.manual_seed(0)
    build_tiny_model("llama").save_pretrained(tmp_path / "src", max_shard_size="100KB")  # several shards
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 1
    api.quantize_folder(tmp_path / "src", method, tmp_path / "streamed", calibration=IDS, progress=False)
    same_folders(in_memory(tmp_path / "src", method, tmp_path / "memory"), tmp_path / "streamed")
    assert not work_folder(tmp_path / "streamed").exists()


def test_streamed_fp16_tied_model_equals_in_memory(tmp_path):
    import transformers as t

    torch.manual_seed(1)
    config = tiny_config("qwen2")
    config.tie_word_embeddings = True
    t.AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(tmp_path / "src")
    api.quantize_folder(tmp_path / "src", "gptq-int4-g32", tmp_path / "streamed", calibration=IDS, progress=False)
    same_folders(in_memory(tmp_path / "src", "gptq-int4-g32", tmp_path / "memory"), tmp_path / "streamed")


def test_stream_refuses_a_quantised_head_and_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    src = fp16_llama_folder(tmp_path / "src")
    with pytest.raises(LowbitError, match="outside them"):
        api.quantize_folder(src, Recipe("rtn-int4-g32", skip=()), tmp_path / "o1", calibration=IDS)
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, src / "model.safetensors")
    with pytest.raises(LowbitError, match="missing model.layers.1.mlp.up_proj.weight"):
        api.quantize_folder(src, "rtn-int4-g32", tmp_path / "o2", calibration=IDS)


GPTQ_G32 = ["--method", "gptq", "--group-size", "32"]


def _cli(src: Path, out: Path, stop: str | None = None, method: list = GPTQ_G32) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("LOWBIT_TEST_STOP", None)
    if stop:
        env["LOWBIT_TEST_STOP"] = stop
    return subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(src), *method, "--samples", "8", "--seq-len",
                           "32", "--quiet", "--threads", "1", "--stream", "-o", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)


def _llama_folder(src: Path, tokenizer, layers: int, seed: int) -> Path:
    """A tiny random Llama folder of `layers` blocks with the tokenizer's files."""
    import transformers as t

    torch.manual_seed(seed)
    config = tiny_config("llama")
    config.num_hidden_layers = layers
    t.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    return src


def test_interrupted_runs_resume_to_the_same_bytes(tmp_path, tiny_tokenizer):
    """Ctrl-C after block 0 and a kill -9 after block 2 of 4: each rerun of the same command resumes, and
    the result equals the uninterrupted in-memory run's folder (the last run in this process)."""
    from lowbit.cli import main

    src = _llama_folder(tmp_path / "src", tiny_tokenizer, layers=4, seed=2)

    assert main(["quantize", str(src), "--method", "gptq", "--group-size", "32", "--samples", "8", "--seq-len", "32",
                 "--quiet", "-o", str(tmp_path / "memory")]) == 0
    out = tmp_path / "streamed"
    first = _cli(src, out, "0:SIGINT")
    assert first.returncode == 130 and "Traceback" not in first.stderr
    assert "run the same command again to resume at block 1" in first.stderr.strip().splitlines()[-1]
    second = _cli(src, out, "2:SIGKILL")
    assert second.returncode == -9 and not out.exists()
    assert main(["quantize", str(src), "--method", "gptq", "--group-size", "32", "--samples", "8", "--seq-len", "32",
                 "--quiet", "--stream", "-o", str(out)]) == 0   # the third run, in this process
    same_folders(tmp_path / "memory", out)
    assert not work_folder(out).exists()


def test_a_tuned_run_resumes_with_its_full_precision_references(tmp_path, tiny_tokenizer):
    """Block fine-tuning aims at the full-precision model's hidden states, which the journal keeps beside the
    quantised ones: a kill after block 1 of 3 resumes to the uninterrupted run's bytes."""
    from lowbit.cli import main

    src = _llama_folder(tmp_path / "src", tiny_tokenizer, layers=3, seed=3)
    method = ["--method", "quip-ft2"]
    args = ["quantize", str(src), *method, "--samples", "8", "--seq-len", "32", "--quiet", "--threads", "1"]
    assert main(args + ["-o", str(tmp_path / "memory")]) == 0
    out = tmp_path / "streamed"
    assert _cli(src, out, "1:SIGKILL", method).returncode == -9 and not out.exists()
    assert main(args + ["--stream", "-o", str(out)]) == 0
    same_folders(tmp_path / "memory", out)


def test_a_partial_run_of_other_inputs_is_refused(tmp_path, monkeypatch):
    import lowbit.io.streamed as streamed

    def interrupt(index):
        raise KeyboardInterrupt

    src = fp16_llama_folder(tmp_path / "src")
    monkeypatch.setattr(streamed, "_test_stop", interrupt)
    with pytest.raises(streamed.Interrupted, match="resume at block 1"):
        api.quantize_folder(src, "rtn-int4-g32", tmp_path / "o", calibration=IDS, progress=False)
    assert work_folder(tmp_path / "o").is_dir() and not (tmp_path / "o").exists()
    with pytest.raises(LowbitError, match="interrupted run with other inputs"):
        api.quantize_folder(src, "rtn-int8-g32", tmp_path / "o", calibration=IDS, progress=False)


def test_interrupted_while_assembling_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    import lowbit.io.streamed as streamed

    def interrupt(*args):
        raise KeyboardInterrupt

    src = fp16_llama_folder(tmp_path / "src")
    monkeypatch.setattr(streamed, "assemble", interrupt)
    with pytest.raises(streamed.Interrupted, match="2 of 2 blocks done"):
        api.quantize_folder(src, "gptq-int4-g32", tmp_path / "streamed", calibration=IDS, progress=False)
    assert not (tmp_path / "streamed").exists() and not list(tmp_path.glob(".streamed.*.tmp"))
    monkeypatch.undo()
    api.quantize_folder(src, "gptq-int4-g32", tmp_path / "streamed", calibration=IDS, progress=False)
    same_folders(in_memory(src, "gptq-int4-g32", tmp_path / "memory"), tmp_path / "streamed")


def test_a_full_disk_while_writing_a_part_is_one_line(tmp_path, monkeypatch):
    import lowbit.io.parts as parts

    def full(tensors, path):
        raise RuntimeError("I/O error: No space left on device (os error 28)")  # safetensors' own error

    monkeypatch.setattr(parts, "save_file", full)
    with pytest.raises(LowbitError, match=r"no space left on device writing .*part-outside.safetensors; free some"):
        api.quantize_folder(fp16_llama_folder(tmp_path / "src"), "rtn-int4-g32", tmp_path / "o", calibration=IDS)
    assert not list(work_folder(tmp_path / "o").glob(".*.tmp"))


@pytest.mark.slow
def test_a_model_larger_than_the_peak_streams_under_it(tmp_path):
    """benchmarks/streaming.py at a small size: a 0.9 GB fp32 Llama (1024 x 16) streams with a peak resident
    set below its weights, and below the in-memory run's."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "streaming.py"
    spec = importlib.util.spec_from_file_location("streaming_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    weights = bench.write_llama(tmp_path / "llama", 16)
    streamed, _ = bench.measured(tmp_path / "llama", "rtn-int4-g128", 0, 128, stream=True)
    in_memory, _ = bench.measured(tmp_path / "llama", "rtn-int4-g128", 0, 128, stream=False)
    assert streamed < weights < in_memory
