"""`lowbit quantize` end to end, and its one-line errors for user mistakes."""
import json

import pytest

from lowbit.cli import main


def run(capsys, *args):
    capsys.readouterr()  # drop what building the fixture printed
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_quantize_saves_a_loadable_model(tmp_path, tiny_model_dir, capsys):
    src = tiny_model_dir("llama")
    rc, out, err = run(capsys, "quantize", src, "--method", "rtn-int4-g32", "--samples", "4", "--seq-len", "32",
                       "--quiet", "-o", tmp_path / "q")
    assert rc == 0, err
    assert "saved rtn-int4-g32" in out and "moved most" in out
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert len(report) == 14 and all(r["n_tokens"] == 128 for r in report)


@pytest.mark.parametrize("case", ["not_a_model", "missing", "unsupported", "bad_group", "short_calibration", "exists"])
def test_bad_input_one_line_nonzero_no_output(tmp_path, tiny_model_dir, capsys, case):
    src = tiny_model_dir("llama")
    out_dir = tmp_path / "out"
    args = [src, "--method", "rtn-int4-g32", "--samples", "2", "--seq-len", "32", "--quiet", "-o", out_dir]
    expect = {"not_a_model": "not a model folder", "missing": "model folder not found",
              "unsupported": "unsupported architecture", "bad_group": "does not divide",
              "short_calibration": "fewer than one sample", "exists": "already exists"}[case]
    if case == "not_a_model":
        (tmp_path / "empty").mkdir()
        args[0] = tmp_path / "empty"
    elif case == "missing":
        args[0] = tmp_path / "nope"
    elif case == "unsupported":
        bogus = tmp_path / "bogus"
        bogus.mkdir()
        (bogus / "config.json").write_text(json.dumps({"model_type": "not-a-real-arch"}))
        args[0] = bogus
    elif case == "bad_group":
        args[2] = "rtn-int4-g48"
    elif case == "short_calibration":
        (tmp_path / "short.txt").write_text("too short")
        args += ["--calibration", tmp_path / "short.txt"]
    elif case == "exists":
        out_dir.mkdir()
    rc, out, err = run(capsys, "quantize", *args)
    assert rc == 2 and expect in err and err.count("\n") == 1, err
    assert out_dir.exists() == (case == "exists")
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left behind


def test_encoder_model_quantised_weight_only_and_reloaded(tmp_path, tiny_model_dir, capsys):
    import torch

    from lowbit import api

    src = tiny_model_dir("bert")
    rc, out, err = run(capsys, "quantize", src, "--method", "rtn", "--bits", "8", "--group-size", "0",
                       "--samples", "2", "--seq-len", "32", "--quiet", "-o", tmp_path / "q")
    assert rc == 0, err
    original, _ = api.load_model(src)
    loaded, _ = api.load_model(tmp_path / "q")
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state
    assert type(loaded).__name__ == "BertModel"
    assert float((a - b).norm() / a.norm()) < 0.02  # int8 per-channel weights only


@pytest.mark.parametrize("args, message", [
    (["--method", "rtn-int4-g128", "--bits", "3"], "already names its scheme"),
    (["--method", "nf4", "--bits", "3"], "nf4 takes no bits setting"),
    (["--method", "gptq", "--observer", "mse"], "gptq takes no observer setting"),
    (["--method", "rtn", "--bits", "3.5"], "rtn takes whole bits, not 3.5; for 3.5 bits per weight on average, mix "
                                           "schemes under a budget: --budget 3.5bpw"),
    (["--method", "quip", "--bits", "3.3"], "quip takes --bits 2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75 or 4, not 3.3"),
    (["--method", "quip", "--bits", "nan"], "--bits must be a number of bits per weight from 1 to 64, got nan"),
    (["--method", "rtn", "--bits", "inf"], "--bits must be a number of bits per weight from 1 to 64, got inf"),
    (["--method", "gptq", "--bits", "1e-7"], "from 1 to 64, got 1e-07")])
def test_flags_that_would_be_ignored_are_errors(tmp_path, tiny_model_dir, capsys, args, message):
    rc, out, err = run(capsys, "quantize", tiny_model_dir("llama"), *args, "-o", tmp_path / "q")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


@pytest.mark.parametrize("bits, name", [("3.5", "quip-3.5bit"), ("2.25", "quip-2.25bit"), ("4", "quip-4bit"),
                                        ("4.0", "quip-4bit")])
def test_quip_takes_fractional_bits(bits, name):
    import argparse

    from lowbit.pipeline.cli import method_from_args

    args = argparse.Namespace(method="quip", bits=float(bits), group_size=None, observer=None, asym=False)
    assert method_from_args(args).short_name() == name


@pytest.mark.parametrize("edit", [
    lambda m: m.update(modules=[]),
    lambda m: m["modules"].update({"model.layers.0.mlp.down_proj": {"module": "QuantLinear"}}),
    lambda m: m["modules"].update({"model.layers.0.mlp.down_proj": {**m["modules"]["model.layers.0.mlp.down_proj"],
                                                                     "in_features": "256"}}),
    lambda m: m["modules"].update({"model.layers.9.mlp.down_proj": m["modules"]["model.layers.0.mlp.down_proj"]}),
    lambda m: m["recipe"].update(overrides=[["*"]])])
def test_a_malformed_native_config_is_a_one_line_error(tmp_path, tiny_model_dir, capsys, edit):
    assert run(capsys, "quantize", tiny_model_dir("llama"), "--method", "rtn-int4-g32", "--quiet",
               "-o", tmp_path / "q")[0] == 0
    meta = json.loads((tmp_path / "q" / "lowbit_config.json").read_text())
    edit(meta)
    (tmp_path / "q" / "lowbit_config.json").write_text(json.dumps(meta))
    rc, out, err = run(capsys, "eval", tmp_path / "q", "--no-speed", "--max-eval-tokens", "256")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_calibration_free_method_reads_no_text_and_runs_no_forward_pass(tmp_path, tiny_model_dir, capsys,
                                                                         monkeypatch):
    from lowbit import api
    from lowbit.pipeline import blocks, calibration, runner

    def never(*args, **kwargs):
        raise AssertionError("a calibration-free method ran a forward pass or read calibration text")

    def no_batches(model, first_block, batches):
        assert batches == [], "a calibration-free method ran the model on calibration batches"
        return []

    monkeypatch.setattr(blocks, "run_block", never)
    monkeypatch.setattr(runner, "capture_block_inputs", no_batches)
    monkeypatch.setattr(api, "build_calibration", never)
    monkeypatch.setattr(calibration, "read_texts", never)
    rc, out, err = run(capsys, "quantize", tiny_model_dir("llama"), "--method", "hqq-int4-g64", "--quiet",
                       "-o", tmp_path / "q")
    assert rc == 0, err
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert len(report) == 14 and all(r["n_tokens"] == 0 and not r["warnings"] for r in report)
    assert all(r["method"] == "hqq-int4-g64" and r["bits_per_weight"] == 4.5 for r in report)
    assert (tmp_path / "q" / "tokenizer.json").is_file()
