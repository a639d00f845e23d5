"""`lowbit train-fp8` end to end on a tiny Llama: output folder, one-line errors, interrupt then resume."""
import json

import pytest

from lowbit.cli import main
from lowbit.data import bundled_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    text = tmp_path / "text.txt"
    text.write_text(bundled_text("calibration")[:12000], encoding="utf-8")
    args = [str(tiny_model_dir("llama")), "--scratch", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
            "--warmup", "1", "--eval-every", "2", "--checkpoint-every", "1", "--train-file", str(text),
            "--eval-file", str(text), "--history-len", "3"]
    return tmp_path, args


def test_interrupted_run_resumes_and_writes_the_folder(setup, capsys, monkeypatch):
    import lowbit.train.fp8_run as run

    tmp_path, args = setup
    out = tmp_path / "out"
    real = run.held_out_loss

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "held_out_loss", interrupted)   # Ctrl-C during the evaluation after step 2
    assert main(["train-fp8", *args, "-o", str(out)]) == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume from" in err and "step-00000000" in err   # step 1 done (0-based names)
    assert not out.exists()
    monkeypatch.setattr(run, "held_out_loss", real)
    assert main(["train-fp8", *args, "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.err and "step 1/3" in captured.err
    summary = json.loads((out / "lowbit_fp8_train.json").read_text())
    assert summary["steps"] == 3 and summary["fp8_linears"] == 14 and summary["history"]["resumed_from"] == 1
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG" and (out / "config.json").is_file()
    assert not (tmp_path / "out.checkpoints").exists()   # done: nothing left to resume
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:   # plain Linears again: no FP8 state saved
        keys = list(f.keys())
    assert "model.layers.0.mlp.up_proj.weight" in keys and not any("fp8_" in k for k in keys)
    assert "held-out loss" in captured.out


@pytest.mark.parametrize("extra, message", [
    (["--history-len", "0"], "must be at least 1"),
    (["--margin", "-1"], "must be at least 0"),
    (["--seq-len", "4096"], "longer than the model's context"),
])
def test_bad_settings_are_one_line_errors(setup, capsys, extra, message):
    tmp_path, args = setup
    code = _run(["train-fp8", *args, *extra, "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _run(argv):
    try:
        return main(argv)
    except SystemExit as e:   # argparse's own errors
        return e.code
