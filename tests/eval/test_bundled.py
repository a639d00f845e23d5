"""The bundled model, evaluated by lowbit, against the numbers its training script measured independently."""
import json

import pytest

from lowbit.data import data_dir


@pytest.mark.slow
def test_bundled_perplexity_matches_the_training_report():
    from lowbit import api
    from lowbit.eval.evaluate import evaluate

    path = data_dir() / "lowbit-tiny-llama"
    report = json.loads((path / "training.json").read_text())
    model, tok = api.load_model(None)
    row = evaluate(model, tok, max_eval_tokens=10 ** 6, context=256, speed=False)
    # training.json: eval.txt, each document prefixed with <|endoftext|>, 256-token windows, tail dropped
    assert row["n_scored"] == report["eval_windows"] * 255
    assert row["perplexity"] == pytest.approx(report["final_eval_perplexity"], abs=1e-4)
