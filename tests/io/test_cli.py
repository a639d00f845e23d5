"""`lowbit export` / `lowbit import` through the registry, checked against the files' own readers."""
import json
import re

import pytest
import torch

from lowbit import api
from lowbit.cli import main


def run(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_gptq_export_then_import_is_bit_identical(tmp_path, tiny_model_dir, capsys):
    src = tiny_model_dir("llama")
    assert run(capsys, "quantize", src, "--method", "rtn-int4-g32", "--samples", "2", "--seq-len", "32",
               "--quiet", "-o", tmp_path / "q")[0] == 0
    rc, out, err = run(capsys, "export", tmp_path / "q", "--format", "gptq", "-o", tmp_path / "gptq")
    assert rc == 0, err
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["bits"] == 4
    rc, out, err = run(capsys, "import", tmp_path / "gptq", "--format", "gptq", "-o", tmp_path / "back")
    assert rc == 0, err
    a, _ = api.load_model(tmp_path / "q")
    b, _ = api.load_model(tmp_path / "back")
    wa = {n: m.dequantized_weight() for n, m in a.named_modules() if hasattr(m, "dequantized_weight")}
    wb = {n: m.dequantized_weight() for n, m in b.named_modules() if hasattr(m, "dequantized_weight")}
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


def bar_count(err: str, what: str) -> tuple[int, int] | None:
    """(n, total) of the last state tqdm drew of the bar labelled `what` on stderr, or None."""
    states = re.findall(rf"{re.escape(what)}: +\d+%\|[^|]*\| (\d+)/(\d+) ", err)
    return tuple(map(int, states[-1])) if states else None


def stored_tensors(folder) -> int:
    """How many tensors a folder's model.safetensors holds, by safetensors' own reader."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return len(list(f.keys()))


@pytest.mark.parametrize("fmt,method,label", [("gptq", "rtn-int4-g32", "GPTQ"), ("awq", "rtn-uint4-g32", "AWQ"),
                                              ("bnb", "nf4", "bnb"), ("compressed-tensors", "rtn-int4-g32",
                                                                      "compressed-tensors"),
                                              ("aqlm", "aqlm-r1-steps5", "AQLM")])
def test_export_and_import_count_every_tensor_on_stderr(tmp_path, tiny_model_dir, capsys, one_thread, fmt, method,
                                                        label):
    """Each bar's final n/total is the number of tensors safetensors finds in the exported file."""
    what = f"{label} tensors"
    assert run(capsys, "quantize", tiny_model_dir("llama"), "--method", method, "--quiet", "-o", tmp_path / "q")[0] == 0
    rc, out, err = run(capsys, "export", tmp_path / "q", "--format", fmt, "-o", tmp_path / "x")
    assert rc == 0, err
    n = stored_tensors(tmp_path / "x")
    assert bar_count(err, what) == (n, n) and what not in out      # stdout keeps only the result
    rc, out, err = run(capsys, "import", tmp_path / "x", "--format", fmt, "-o", tmp_path / "back")
    assert rc == 0, err
    assert bar_count(err, "reading tensors") == (n, n) and bar_count(err, f"unpacking {label}") == (n, n)
    rc, out, err = run(capsys, "import", tmp_path / "x", "--format", fmt, "--quiet", "-o", tmp_path / "b2")
    assert rc == 0 and err == ""


def test_gguf_export_is_read_back_by_the_gguf_package(tmp_path, tiny_model_dir, capsys):
    from gguf import GGUFReader

    src = tiny_model_dir("llama")
    rc, out, err = run(capsys, "export", src, "--format", "gguf", "--type", "Q8_0", "-o", tmp_path / "m.gguf")
    assert rc == 0, err
    names = {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    model, tok = api.load_model(tmp_path / "m.gguf")  # .gguf files load directly
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("args,message", [
    (["export", "--format", "nope", "-o", "X"], "unknown export format"),
    (["export", "--format", "gptq", "--type", "Q4_0", "-o", "X"], "--type applies to --format gguf only"),
    (["import", "missing-folder", "--format", "gptq", "-o", "X"], "not found"),
])
def test_export_errors_are_one_line(tmp_path, capsys, args, message):
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    rc, out, err = run(capsys, *args)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_gguf_export_copies_a_q4_0_shaped_weight_and_refuses_others(tmp_path, tiny_model_dir, capsys):
    from gguf import GGUFReader

    from lowbit.weights.ggml import unpack_ggml

    src = tiny_model_dir("llama")
    for method in ("rtn-int4-g32", "rtn-int4-g64"):
        assert run(capsys, "quantize", src, "--method", method, "--quiet", "-o", tmp_path / method)[0] == 0
    rc, out, err = run(capsys, "export", tmp_path / "rtn-int4-g32", "--format", "gguf", "--type", "Q4_0",
                       "-o", tmp_path / "a.gguf")
    assert rc == 0, err
    native = api.load(tmp_path / "rtn-int4-g32")[0].model.layers[1].mlp.down_proj.quantized()
    tensor = next(t for t in GGUFReader(tmp_path / "a.gguf").tensors if t.name == "blk.1.ffn_down.weight")
    fields = unpack_ggml(torch.from_numpy(tensor.data.copy()), "Q4_0")
    rows, cols = native.shape
    assert torch.equal(fields.d, native.scale)                     # the scales, as stored
    levels = native.spec.number_format.decode(native.codes).reshape(rows, cols // 32, 1, 32)
    assert torch.equal(fields.q.float(), levels)                   # the codes, as stored
    # int4 g64 is no ggml type: a one-line refusal and no file, unless re-rounding is asked for
    rc, out, err = run(capsys, "export", tmp_path / "rtn-int4-g64", "--format", "gguf", "--type", "Q4_0",
                       "-o", tmp_path / "b.gguf")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--requantize" in err and "int4 g64" in err
    assert not (tmp_path / "b.gguf").exists()
    rc, out, err = run(capsys, "export", tmp_path / "rtn-int4-g64", "--format", "gguf", "--type", "Q4_0",
                       "--requantize", "-o", tmp_path / "b.gguf")
    assert rc == 0 and "rounded again" in out and (tmp_path / "b.gguf").exists()


def test_gguf_export_of_held_blocks_with_another_type_is_refused(tmp_path, tiny_model_dir, capsys):
    src = tiny_model_dir("llama")
    assert run(capsys, "quantize", src, "--method", "ggml-q4_0", "--quiet", "-o", tmp_path / "q")[0] == 0
    rc, out, err = run(capsys, "export", tmp_path / "q", "--format", "gguf", "--type", "Q8_0", "-o", tmp_path / "x.gguf")
    assert rc == 2 and "holds Q4_0 blocks" in err and not (tmp_path / "x.gguf").exists()
    assert run(capsys, "export", tmp_path / "q", "--format", "gguf", "-o", tmp_path / "y.gguf")[0] == 0


def test_export_verify_runs_the_consumer(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("compressed_tensors")
    src = tiny_model_dir("llama")
    assert run(capsys, "quantize", src, "--method", "rtn-int4-g32", "--quiet", "-o", tmp_path / "q")[0] == 0
    rc, out, err = run(capsys, "export", tmp_path / "q", "--format", "compressed-tensors", "--verify",
                       "-o", tmp_path / "ct")
    assert rc == 0, err
    line = out.strip().splitlines()[-1]
    assert line.startswith("verify: transformers loads") and "agrees with lowbit's model on" in line
    assert float(line.split(" on ")[1].split("%")[0]) >= 99.0      # the same weights, decompressed
    # gptq / awq are verified by vLLM from its own environment: tests/serving/test_vllm.py


def test_gguf_export_and_import_show_progress_on_stderr_and_quiet_hides_it(tmp_path, tiny_model_dir, capsys,
                                                                           one_thread):
    from gguf import GGUFReader

    src = tiny_model_dir("llama")
    rc, out, err = run(capsys, "export", src, "--format", "gguf", "--type", "Q8_0", "-o", tmp_path / "m.gguf")
    assert rc == 0, err
    n = len(GGUFReader(tmp_path / "m.gguf").tensors)
    assert "GGUF tensors" in err and f"{n}/{n}" in err and "GGUF" not in out   # stdout keeps only the result
    rc, out, err = run(capsys, "import", tmp_path / "m.gguf", "--format", "gguf", "-o", tmp_path / "back")
    assert rc == 0, err
    assert bar_count(err, "GGUF tensors") == (n, n) and f"writing the native folder {tmp_path / 'back'}" in err
    rc, out, err = run(capsys, "import", tmp_path / "m.gguf", "--format", "gguf", "--quiet", "-o", tmp_path / "b2")
    assert rc == 0 and err == ""


def test_gguf_api_is_silent_by_default(tmp_path, tiny_model_dir, capsys, one_thread):
    from lowbit.io.gguf import export_gguf
    from lowbit.io.gguf_read import load_gguf

    model, tok = api.load_model(tiny_model_dir("llama"))
    capsys.readouterr()
    export_gguf(model, tmp_path / "m.gguf", tok, type="Q8_0")
    load_gguf(tmp_path / "m.gguf")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("fmt,method", [("gptq", "rtn-int4-g32"), ("bnb", "nf4")])
def test_hf_folder_api_is_silent_by_default(tmp_path, tiny_model_dir, capsys, one_thread, fmt, method):
    from lowbit.io import get_exporter, get_importer

    model, tok = api.load_model(tiny_model_dir("llama"))
    api.quantize(model, method, progress=False)
    capsys.readouterr()
    get_exporter(fmt).export(model, tmp_path / "x", tok)
    get_importer(fmt)(tmp_path / "x")
    assert capsys.readouterr().err == ""


def test_packed_tensors_total_follows_layers_that_pack_differently(capsys):
    from lowbit.io.progress import packed_tensors

    weights = {"a": 1, "b": 2, "c": 1}        # a layer packs into as many tensors as its value (a bias, say)
    out = packed_tensors({"f": 0}, weights, lambda n, k: {f"{n}.{i}": i for i in range(k)}, "test tensors", True)
    assert len(out) == 5 and bar_count(capsys.readouterr().err, "test tensors") == (5, 5)
