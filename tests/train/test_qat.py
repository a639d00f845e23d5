"""QAT: the converted model computes exactly what the fake-quantised model computed, learned scales move,
the result saves, exports and resumes like any lowbit model."""
import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.methods import parse_method
from lowbit.train.loop import LoopSettings, train_loop
from lowbit.train.qat import FakeQuantLinear, QATSettings, convert_qat, fake_quant_modules, prepare_qat
from tests.conftest import build_tiny_model
from tests.train.helpers import interrupted_at

IDS = torch.randint(0, 512, (6000,), generator=torch.Generator().manual_seed(0))
LOOP = LoopSettings(steps=3, lr=1e-2, batch_size=2, seq_len=32, warmup=1, log_every=0, eval_every=0)


def reference_path(model):
    """Send every packed module through its Python reference path (the fused kernels sum in another order)."""
    for m in model.modules():
        if hasattr(m, "_plan"):
            m._plan = False


@pytest.mark.parametrize("scheme", ["int3-g32", "uint4-g32", "int2-g64", "nf4-g32", "fp8_e4m3", "mxfp4",
                                    "int4-g32-sbf16"])
def test_converted_model_equals_the_fake_quantised_model_exactly(scheme, one_thread):
    model = build_tiny_model("llama")
    prepare_qat(model, parse_method(f"qat-{scheme}"))
    before = {n: m.scale.detach().clone() for n, m in fake_quant_modules(model).items()}
    train_loop(model, [p for p in model.parameters() if p.requires_grad], IDS, LOOP, progress=False)
    fakes = fake_quant_modules(model)
    if fakes["model.layers.0.mlp.down_proj"].learn:     # LSQ moved the step sizes
        assert any(not torch.equal(before[n], m.scale) for n, m in fakes.items())
    fake_weights = {n: m.fake_weight().detach() for n, m in fakes.items()}
    ids = IDS[:64].reshape(2, 32)
    with torch.no_grad():
        expected = model(ids).logits
    convert_qat(model)
    assert not fake_quant_modules(model)
    assert model.lowbit_recipe.default == parse_method(f"qat-{scheme}")
    for name, w in fake_weights.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight().float(), w), name
    reference_path(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_lm_head_stays_float_and_bad_schemes_are_refused():
    model = build_tiny_model("llama")
    names = prepare_qat(model, parse_method("qat-int4-g32"))
    assert "lm_head" not in names and len(names) == 14
    with pytest.raises(LowbitError, match="does not divide"):
        prepare_qat(build_tiny_model("llama"), parse_method("qat-int4-g48"))
    with pytest.raises(LowbitError, match="int8-sfp32"):
        prepare_qat(build_tiny_model("llama"), parse_method("qat-int4-g32"), QATSettings(act_bits=8))


def test_int8_activations_convert_to_w8a8(one_thread):
    from lowbit.nn.w8a8 import W8A8Linear

    model = build_tiny_model("llama")
    prepare_qat(model, parse_method("qat-int8-sfp32"), QATSettings(act_bits=8))
    fake = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = fake(x)
    convert_qat(model)
    real = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(real, W8A8Linear)
    with torch.no_grad():   # int32 sums vs fp32 sums of the same int8 products: equal up to fp32 rounding
        assert torch.allclose(real(x), expected, atol=1e-5, rtol=1e-5)


def test_qat_folder_loads_exports_and_resumes(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    from lowbit import api
    from lowbit.data import bundled_text
    from lowbit.io import get_exporter, get_importer, quantized_weights
    from lowbit.train import qat_run
    from lowbit.train.qat_run import QATJob, run_qat

    text = bundled_text("calibration")[:30000]
    folder = tiny_model_dir("llama")
    loop = LoopSettings(steps=4, lr=1e-3, batch_size=2, seq_len=32, warmup=1, checkpoint_every=2, eval_every=2,
                        log_every=0)
    whole = run_qat(QATJob(str(folder), "int4-g32", str(tmp_path / "whole"), False, "rtn", text, text),
                    loop, progress=False)

    real_loss = qat_run._next_token_loss
    job = QATJob(str(folder), "int4-g32", str(tmp_path / "resumed"), False, "rtn", text, text)
    monkeypatch.setattr(qat_run, "_next_token_loss", interrupted_at(4, real_loss))
    with pytest.raises(KeyboardInterrupt):
        run_qat(job, loop, progress=False)
    assert not (tmp_path / "resumed").exists() and job.checkpoints().is_dir()
    monkeypatch.setattr(qat_run, "_next_token_loss", real_loss)
    resumed = run_qat(job, loop, progress=False)
    assert resumed["losses"] == whole["losses"] and resumed["perplexity"] == whole["perplexity"]
    assert not job.checkpoints().exists()

    out = tmp_path / "resumed"
    summary = json.loads((out / "lowbit_qat.json").read_text())
    assert summary["steps"] == 4 and (out / "qat_loss.png").read_bytes()[:4] == b"\x89PNG"
    model, tok = api.load(out)
    weights = quantized_weights(model)
    assert len(weights) == 14
    ct = get_exporter("compressed-tensors").export(model, tmp_path / "ct", tokenizer=tok)
    back, _ = get_importer("compressed-tensors")(ct)
    for name, w in quantized_weights(back).items():
        assert torch.equal(w.dequantize().float(), weights[name].dequantize().float()), name
    assert isinstance(next(m for m in model.modules() if hasattr(m, "layer_config")), torch.nn.Module)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())


def test_qat_command_reports_what_the_saved_folder_scores(tiny_model_dir, tmp_path, capsys, one_thread):
    from lowbit import api
    from lowbit.cli import main
    from lowbit.data import bundled_text
    from lowbit.eval.evaluate import tokenize
    from lowbit.eval.perplexity import perplexity

    folder = tiny_model_dir("llama")
    text = bundled_text("calibration")
    (tmp_path / "train.txt").write_text(text[:20000])
    (tmp_path / "eval.txt").write_text(text[20000:26000])
    out = tmp_path / "qat"
    files = ["--train-file", str(tmp_path / "train.txt"), "--eval-file", str(tmp_path / "eval.txt")]
    # no --seq-len: the default 256 is shortened to the tiny model's context of 128
    rc = main(["qat", str(folder), "-o", str(out), "--scheme", "int4-g32", "--steps", "6", "--batch-size", "2",
               "--lr", "1e-3", "--eval-every", "3", "--log-every", "2", *files])
    assert rc == 0
    err = capsys.readouterr().err
    assert "step 2/6" in err and "step 6/6" in err and "eval" in err
    summary = json.loads((out / "lowbit_qat.json").read_text())
    assert summary["loop"]["seq_len"] == 128 and summary["loop"]["warmup"] == 1
    model, tok = api.load(out)
    ids = tokenize(tok, (tmp_path / "eval.txt").read_text())
    with torch.no_grad():
        assert perplexity(model, ids).perplexity == pytest.approx(summary["perplexity"]["qat"], rel=1e-5)
    assert summary["perplexity"]["qat"] == pytest.approx(summary["perplexity"]["qat_fake_quant"], rel=1e-4)

    assert main(["qat", str(folder), "-o", str(out), "--steps", "2"]) != 0            # output exists
    assert main(["qat", str(folder), "-o", str(tmp_path / "b"), "--scheme", "int4-g48", "--steps", "2",
                 "--seq-len", "64", *files]) != 0
    assert main(["qat", str(folder), "-o", str(tmp_path / "c"), "--scheme", "int9", "--steps", "2", *files]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "already exists" in err and "does not divide" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    # QAT's values come from training: the solvers' commands refuse it rather than run its RTN start
    assert main(["quantize", str(folder), "--method", "qat-int4-g32", "-o", str(tmp_path / "d")]) != 0
    assert main(["compare", "--methods", "fp16,qat-int3"]) != 0
    err = capsys.readouterr().err
    assert err.count("is trained, not solved") == 2 and "Traceback" not in err


def test_qat_can_start_from_the_gptq_solution(one_thread):
    import copy

    from lowbit import api
    from lowbit.io import quantized_weights

    base = build_tiny_model("llama")
    calibration = IDS[:2048].reshape(16, 128)
    ptq = api.quantize(copy.deepcopy(base), parse_method("gptq-int3-g32"), calibration=calibration, progress=False)
    prepare_qat(base, parse_method("qat-int3-g32"), init=quantized_weights(ptq))
    reference_path(ptq)
    ids = IDS[:64].reshape(2, 32)
    with torch.no_grad():      # the fake-quantised start is GPTQ's model, exactly
        assert torch.equal(base(ids).logits, ptq(ids).logits)
    with pytest.raises(LowbitError, match="same scheme"):
        prepare_qat(build_tiny_model("llama"), parse_method("qat-int4-g32"), init=quantized_weights(ptq))


def test_qat_refuses_long_windows_before_gptq_and_names_an_empty_training_text(tiny_model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    from lowbit.cli import main
    from lowbit.train import qat_run

    folder = tiny_model_dir("llama")
    limit = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    monkeypatch.setattr(qat_run, "starting_weights", lambda *a: pytest.fail("GPTQ ran before the check"))
    (tmp_path / "empty.txt").write_text("")
    capsys.readouterr()
    for args, words in ((["--seq-len", str(limit + 1)], "longer than the model's context"),
                        (["--seq-len", "64", "--train-file", str(tmp_path / "empty.txt")], "training text is empty"),
                        (["--seq-len", "64", "--act-bits", "8"], "int8-sfp32")):
        assert main(["qat", str(folder), "-o", str(tmp_path / "q"), "--scheme", "int4-g32", "--steps", "1",
                     "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lowbit: error:") and words in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "q").exists()


def test_negative_eval_and_checkpoint_intervals_are_refused(tmp_path, capsys):
    from lowbit.cli import main

    for option in ("--eval-every", "--checkpoint-every"):
        with pytest.raises(SystemExit) as info:
            main(["qat", "-o", str(tmp_path / "q"), option, "-1"])
        assert info.value.code == 2 and "at least 0" in capsys.readouterr().err


def test_a_failure_while_saving_leaves_no_output_folder(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    from lowbit.data import bundled_text
    from lowbit.train import qat_run
    from lowbit.train.qat_run import QATJob, run_qat

    def broken_plot(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(qat_run, "write_loss_curve", broken_plot)
    text = bundled_text("calibration")[:20000]
    job = QATJob(str(tiny_model_dir("llama")), "int4-g32", str(tmp_path / "out"), False, "rtn", text, text)
    loop = LoopSettings(steps=2, lr=1e-3, batch_size=2, seq_len=32, warmup=0, log_every=0, eval_every=0)
    with pytest.raises(OSError):
        run_qat(job, loop, progress=False)
    assert not (tmp_path / "out").exists() and job.checkpoints().is_dir()   # nothing half-written; resumable
