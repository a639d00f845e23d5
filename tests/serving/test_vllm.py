"""vLLM's CPU build serves lowbit's compressed-tensors, GPTQ and AWQ exports of the bundled model, and its
next-token predictions agree with lowbit's own model. vLLM runs in an environment of its own (it pins
other transformers/compressed-tensors versions): `make test-serving` makes `.venv-serving` and runs these
tests; without it they skip, saying why.

vLLM computes in bf16 with its own kernels (and the non-quantised tensors are stored at bf16), lowbit in
fp32: agreement is measured, not exact — teacher-forced top-1 over held-out windows and greedy tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit.io
from lowbit import api

pytestmark = pytest.mark.serving
ROOT = Path(__file__).resolve().parents[2]
SERVING_PYTHON = Path(os.environ.get("LOWBIT_SERVING_PYTHON", ROOT / ".venv-serving" / "bin" / "python"))
RESULTS = os.environ.get("LOWBIT_SERVING_RESULTS")
EXPORTS = {   # model name -> (lowbit method, export format)
    "ct-w4a16-gptq": ("gptq-int4-g128", "compressed-tensors"), "ct-w4a16-awq-asym": ("awq-uint4-g128", "compressed-tensors"),
    "ct-w8a8-dynamic": ("w8a8", "compressed-tensors"), "gptq": ("gptq-int4-g128", "gptq"), "awq": ("awq-uint4-g128", "awq"),
}
N_CTX, WINDOWS, PROMPT, MAX_TOKENS, SAMPLES = 256, 2, 32, 16, 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not SERVING_PYTHON.is_file():
        pytest.skip(f"no vLLM environment at {SERVING_PYTHON} (make test-serving creates it)")
    from lowbit.data import bundled_text

    folder = tmp_path_factory.mktemp("serving")
    base, tok = api.load_model()
    ids = tok(bundled_text("eval")[:120000])["input_ids"]
    # vLLM's max_model_len (the model's 256 positions) counts the window plus the one token it generates
    windows = [ids[i * N_CTX:(i + 1) * N_CTX - 1] for i in range(WINDOWS)]
    prompts = [w[:PROMPT] for w in windows]
    models, ours, quantised = {}, {}, {}
    for name, (method, fmt) in EXPORTS.items():
        if method not in quantised:
            quantised[method] = api.quantize(api.load_model()[0], method, tokenizer=tok, n_samples=SAMPLES,
                                             progress=False)
        model = quantised[method]
        models[name] = str(api.export(model, folder / name, format=fmt, tokenizer=tok))
        ours[name] = lowbit_predictions(model, windows, prompts)
    job = folder / "job.json"
    job.write_text(json.dumps({"models": models, "windows": windows, "prompts": prompts, "max_tokens": MAX_TOKENS}))
    out = folder / "vllm.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    runner = Path(lowbit.io.__file__).with_name("vllm_runner.py")
    done = subprocess.run([str(SERVING_PYTHON), str(runner), str(job), str(out)], capture_output=True, text=True,
                          env=env, timeout=3000)
    assert done.returncode == 0, done.stderr[-4000:]
    return ours, json.loads(out.read_text())


def lowbit_predictions(model, windows, prompts) -> dict:
    with torch.no_grad():
        top1 = [model(torch.tensor([w])).logits[0, :-1].argmax(-1).tolist() for w in windows]
        runs = [model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                               return_dict_in_generate=True) for p in prompts]
    greedy = [r.sequences[0, len(p):].tolist() for r, p in zip(runs, prompts)]
    top2 = [[[[i, v] for v, i in zip(*s[0].log_softmax(-1).topk(2))] for s in r.scores] for r in runs]
    top2 = [[[[int(i), float(v)] for i, v in step] for step in steps] for steps in top2]
    return {"top1": top1, "greedy": greedy, "greedy_top2": top2}


NEAR_TIE = 0.5   # nats between the two most likely tokens, in one engine at least


def near_tie(a: list, b: list) -> bool:
    """a, b: one step's [[token, logprob] rank 1, rank 2] in each engine. The same two tokens on top in both
    (the prefixes are equal up to the first divergence, so the two distributions are over the same context)
    and, in one engine at least, less than NEAR_TIE apart."""
    same_pair = {t for t, _ in a} == {t for t, _ in b}
    return same_pair and min(a[0][1] - a[1][1], b[0][1] - b[1][1]) < NEAR_TIE


def agreement(ours: dict, theirs: dict) -> dict:
    """Teacher-forced top-1 agreement, and per prompt the greedy tokens before the first divergence and whether
    that divergence is a near-tie (near_tie)."""
    a = torch.tensor(sum(ours["top1"], [])), torch.tensor(sum(theirs["top1"], []))
    first_divergence, ties = [], []
    for k, (x, y) in enumerate(zip(ours["greedy"], theirs["greedy"])):
        same = [i for i, (u, v) in enumerate(zip(x, y)) if u != v]
        first_divergence.append(same[0] if same else len(x))
        if same:
            i = same[0]
            ties.append(near_tie(ours["greedy_top2"][k][i], theirs["greedy_top2"][k][i]))
    return {"top1_agreement": round(float((a[0] == a[1]).float().mean()), 4), "positions": len(a[0]),
            "greedy_tokens_before_divergence": first_divergence, "divergences_at_near_ties": ties}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_vllm_serves_the_export_and_agrees(served, name):
    ours, theirs = served
    stats = agreement(ours[name], theirs[name])
    if RESULTS:
        data = json.loads(Path(RESULTS).read_text()) if Path(RESULTS).exists() else {}
        data[name] = stats
        Path(RESULTS).write_text(json.dumps(data, indent=1))
    print(name, stats, file=sys.stderr)
    assert stats["top1_agreement"] >= 0.9
    # Greedy continuations part at the first near-tie between vLLM's bf16 and lowbit's fp32 logits (the AWQ export
    # has parted after 0, 4 and 16 tokens in different runs). Where they part, it must be a near-tie: the same two
    # tokens on top in both engines, only their order swapped, less than NEAR_TIE apart. A wrong kernel or layout
    # parts on a token the other engine does not rank second, or by a wide margin.
    assert all(stats["divergences_at_near_ties"]), stats


def test_agreement_tells_a_near_tie_from_a_wrong_token():
    assert near_tie([[6, -1.0], [8, -1.1]], [[8, -1.0], [6, -1.2]])          # swapped, 0.1 nats apart
    assert not near_tie([[6, -1.0], [8, -1.1]], [[4, -1.0], [6, -1.1]])      # 4 is not our second choice
    assert not near_tie([[6, -1.0], [8, -2.5]], [[8, -1.0], [6, -2.0]])      # swapped, but 1.0 and 1.5 nats apart
    first = [[5, -1.0], [9, -3.0]]
    ours = {"top1": [[1, 2]], "greedy": [[5, 6, 7]] * 2,
            "greedy_top2": [[first, [[6, -1.0], [8, -1.1]], first]] * 2}
    theirs = {"top1": [[1, 3]], "greedy": [[5, 8, 2], [5, 4, 2]],
              "greedy_top2": [[first, [[8, -1.0], [6, -1.2]], first], [first, [[4, -1.0], [6, -1.1]], first]]}
    stats = agreement(ours, theirs)
    assert stats["top1_agreement"] == 0.5 and stats["greedy_tokens_before_divergence"] == [1, 1]
    assert stats["divergences_at_near_ties"] == [True, False]


def test_export_verify_with_vllm(tmp_path, capsys):
    if not SERVING_PYTHON.is_file():
        pytest.skip(f"no vLLM environment at {SERVING_PYTHON} (make test-serving creates it)")
    from lowbit.cli import main

    assert main(["quantize", "--method", "rtn-int4-g128", "--samples", "8", "--quiet", "-o", str(tmp_path / "q")]) == 0
    os.environ.setdefault("LOWBIT_VLLM_PYTHON", str(SERVING_PYTHON))
    assert main(["export", str(tmp_path / "q"), "--format", "gptq", "--verify", "-o", str(tmp_path / "g")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("verify: vllm loads") and float(line.split(" on ")[1].split("%")[0]) >= 90.0
