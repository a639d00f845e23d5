import json

import pytest
import torch

from lowbit.cli import main
from lowbit.eval.evaluate import eval_windows, evaluate
from lowbit.eval.fidelity import build_reference


def test_cli_compare_writes_json_markdown_and_png(tiny_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["compare", str(tiny_dir), "--methods", "fp16,rtn-int4-g128", "--json", "--out", str(out),
               "--max-eval-tokens", "300", "--context", "64", "--no-speed"])
    printed = json.loads(capsys.readouterr().out)
    assert rc == 0 and [r["method"] for r in printed] == ["fp16", "rtn-int4-g128"]
    assert json.loads((out / "compare.json").read_text()) == printed
    md = (out / "compare.md").read_text()
    assert "| fp16 " in md and "| rtn-int4-g128 " in md and "non-overlapping 64-token windows" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png"]


def test_cli_bad_method_is_one_line_and_exit_2(tiny_dir, capsys):
    rc = main(["compare", str(tiny_dir), "--methods", "fp16,nosuchmethod", "--out", ""])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and captured.err.count("\n") == 1 and "nosuchmethod" in captured.err


def test_cli_eval_reports_protocol_and_kl_against_reference(tiny_dir, capsys):
    rc = main(["eval", str(tiny_dir), "--reference", str(tiny_dir), "--json", "--max-eval-tokens", "300",
               "--context", "64", "--no-speed"])
    row = json.loads(capsys.readouterr().out)
    assert rc == 0 and row["kl"] == pytest.approx(0, abs=1e-9) and row["top1"] == 1.0
    assert row["protocol"].startswith("non-overlapping 64-token windows over 256 held-out tokens")


def test_cli_eval_of_a_saved_quantised_folder_matches_the_in_memory_model(tiny_dir, tmp_path, capsys):
    from lowbit import api
    from lowbit.methods import parse_method

    base, tok = api.load_model(tiny_dir)
    reference = build_reference(base, eval_windows(base, tok, max_eval_tokens=300, context=64))
    model, _ = api.load_model(tiny_dir)
    api.quantize(model, parse_method("rtn-int4-g128"), progress=False)
    expected = evaluate(model, reference=reference, speed=False)
    api.save(model, tmp_path / "q", tokenizer=tok)
    rc = main(["eval", str(tmp_path / "q"), "--reference", str(tiny_dir), "--json", "--max-eval-tokens", "300",
               "--context", "64", "--no-speed"])
    row = json.loads(capsys.readouterr().out)
    assert rc == 0 and row["quantized_linears"] == expected["quantized_linears"] == 14
    assert row["bits_per_weight"] == 4.125 and row["memory_bytes"] == expected["memory_bytes"]
    assert row["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-9)
    assert row["kl"] == pytest.approx(expected["kl"], rel=1e-6) and row["top1"] == expected["top1"]


def test_cli_eval_shows_progress_on_stderr_and_quiet_hides_it(tiny_dir, capsys, one_thread):
    args = ["eval", str(tiny_dir), "--reference", str(tiny_dir), "--json", "--max-eval-tokens", "300", "--no-speed"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr()
    row = json.loads(out.out)                      # the progress never reaches stdout
    n = row["n_scored"] // (row["context"] - 1)   # each window scores context - 1 tokens
    assert "reference windows" in out.err and "scoring windows: 100%" in out.err and f"{n}/{n}" in out.err
    assert main(args + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_evaluate_api_is_silent_by_default(llama, capsys, one_thread):
    from lowbit.eval.evaluate import evaluate
    from lowbit.eval.fidelity import build_reference

    ids = torch.randint(0, llama.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    capsys.readouterr()
    ref = build_reference(llama, ids, context=64)
    evaluate(llama, reference=ref, speed=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("fmt,method", [("gptq", "rtn-int4-g128"), ("awq", "rtn-uint4-g128"), ("bnb", "nf4"),
                                        ("compressed-tensors", "rtn-int8")])
def test_cli_eval_reads_exported_folders_as_the_model_that_wrote_them(tiny_dir, tmp_path, capsys, fmt, method,
                                                                      one_thread):
    """`lowbit eval` on a GPTQ, AWQ, bitsandbytes or compressed-tensors folder scores the very weights that
    were exported: perplexity, KL and top-1 equal the in-memory quantised model's once its unquantised
    tensors (embeddings, norms, head) are rounded to the dtype the format stores them in (fp16 for GPTQ and
    AWQ, bf16 for compressed-tensors, as the engines load them), and every Linear counts as quantised."""
    from safetensors import safe_open

    from lowbit import api
    from lowbit.methods import parse_method

    base, tok = api.load_model(tiny_dir)
    reference = build_reference(base, eval_windows(base, tok, max_eval_tokens=300, context=64))
    model, _ = api.load_model(tiny_dir)
    api.quantize(model, parse_method(method), progress=False)
    api.export(model, tmp_path / fmt, fmt, tokenizer=tok)
    with safe_open(next((tmp_path / fmt).glob("*.safetensors")), "pt") as f:
        stored = f.get_tensor("model.embed_tokens.weight").dtype
    with torch.no_grad():
        for p in model.parameters():   # the quantised Linears hold buffers: only the float tensors are rounded
            p.copy_(p.to(stored).float())
    expected = evaluate(model, reference=reference, speed=False)
    rc = main(["eval", str(tmp_path / fmt), "--reference", str(tiny_dir), "--json", "--max-eval-tokens", "300",
               "--context", "64", "--no-speed", "--quiet"])
    row = json.loads(capsys.readouterr().out)
    assert rc == 0 and row["quantized_linears"] == expected["quantized_linears"] == 14
    assert row["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-9)
    assert row["kl"] == pytest.approx(expected["kl"], rel=1e-6) and row["top1"] == expected["top1"]
