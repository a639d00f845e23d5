"""`lowbit export --verify`: run the software that consumes a written file and measure how far its
predictions agree with lowbit's own model on held-out text.

    gguf                 llama.cpp (llama-cpp-python), logits
    compressed-tensors   transformers (decompressing through compressed-tensors), logits
    bnb                  transformers with bitsandbytes, logits
    aqlm                 transformers with the aqlm package (its CPU kernels: numba for 2^8-entry codebooks), logits
    gptq, awq            vLLM's CPU build from `.venv-serving` (or LOWBIT_VLLM_PYTHON), teacher-forced top-1

Agreement: over a few windows of the bundled held-out text, the fraction of positions where the
consumer's next token equals lowbit's, and the mean |logit difference| where the consumer gives logits.
A consumer that is not installed is reported as such, never faked.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from lowbit.errors import LowbitError

WINDOWS, CONTEXT = 2, 128
CONSUMERS = {"gguf": "llama.cpp", "compressed-tensors": "transformers", "bnb": "transformers", "gptq": "vllm",
             "awq": "vllm", "aqlm": "transformers"}


def held_out_windows(model, tokenizer, n: int = WINDOWS) -> list[list[int]]:
    from lowbit.data import bundled_text

    # one position short of the model's context: vLLM counts the scored window plus one generated token
    ctx = min(CONTEXT, (getattr(model.config, "max_position_embeddings", CONTEXT + 1) or CONTEXT + 1) - 1)
    ids = tokenizer(bundled_text("eval")[: 40 * ctx * n])["input_ids"]
    if len(ids) < ctx * n:
        raise LowbitError("not enough held-out text to verify with")
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n)]


def our_logits(model, windows) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([w])).logits[0].float() for w in windows]


@contextmanager
def _plain_llama_cpp_kernels():
    """llama.cpp's AMX weight repacking crashes on some CPUs (tests/llamacpp.py): load without it."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


def llama_cpp_logits(path, windows) -> list[torch.Tensor]:
    import llama_cpp
    import numpy as np

    with _plain_llama_cpp_kernels():
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=len(windows[0]), n_threads=2,
                              verbose=False)
    out = []
    try:
        for w in windows:
            llm.reset()
            llm.eval(w)
            out.append(torch.from_numpy(np.array(llm.scores[:len(w)], dtype=np.float32)))
    finally:
        llm.close()
    return out


@contextmanager
def serial_numba():
    """Numba kernels on one thread inside the block. aqlm 1.1.7's CPU kernel for 2^8-entry codebooks
    (aqlm/inference_kernels/numba_kernel.py) adds into one output vector from a `prange` over the input
    groups, so with more than one numba thread the sums race: on some calls, at random, logits off by up to
    0.3 on a tiny Llama and 5.0 on the bundled model, against 2e-7 and 2e-5 on one thread."""
    try:
        import numba
    except ImportError:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def transformers_logits(path, windows) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with serial_numba():
        return our_logits(model, windows)


def vllm_top1(path, windows) -> list[list[int]]:
    python = Path(os.environ.get("LOWBIT_VLLM_PYTHON", ".venv-serving/bin/python"))
    if not python.is_file():
        raise ModuleNotFoundError(f"no vLLM environment at {python} (`make test-serving` makes it)")
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"models": {"m": str(path)}, "windows": windows, "prompts": [windows[0][:8]],
                                   "max_tokens": 1, "max_model_len": len(windows[0]) + 1}))
        done = subprocess.run([str(python), str(Path(__file__).with_name("vllm_runner.py")), str(job), str(out)],
                              capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        if done.returncode:
            raise LowbitError(f"vLLM could not serve {path}: {done.stderr.strip().splitlines()[-1][:200]}")
        return json.loads(out.read_text())["m"]["top1"]


def agreement(ours: list[torch.Tensor], theirs) -> dict:
    """Top-1 agreement of next-token predictions (and mean |logit difference| when `theirs` are logits)."""
    a = torch.cat([o[:-1].argmax(-1) for o in ours])
    if theirs and isinstance(theirs[0], torch.Tensor):
        b = torch.cat([t[:-1].argmax(-1) for t in theirs])
        diff = float(torch.cat([(o - t).abs().mean(-1) for o, t in zip(ours, theirs)]).mean())
        return {"top1_agreement": float((a == b).float().mean()), "mean_abs_logit_diff": diff, "positions": len(a)}
    b = torch.tensor(sum(theirs, []))
    return {"top1_agreement": float((a == b).float().mean()), "positions": len(a)}


def verify(fmt: str, path, model, tokenizer) -> str:
    """One line: the consumer's agreement with `model` on held-out text, or why it could not run."""
    consumer = CONSUMERS.get(fmt)
    if consumer is None:
        return f"verify: no consumer is known for {fmt}"
    if tokenizer is None:
        return "verify: the model has no tokenizer to make held-out text with"
    windows = held_out_windows(model, tokenizer)
    run = {"llama.cpp": llama_cpp_logits, "transformers": transformers_logits, "vllm": vllm_top1}[consumer]
    try:
        theirs = run(path, windows)
    except (ImportError, ModuleNotFoundError) as e:
        return f"verify: {consumer} is not available here ({str(e).splitlines()[0]})"
    stats = agreement(our_logits(model, windows), theirs)
    diff = f", mean |logit diff| {stats['mean_abs_logit_diff']:.4f}" if "mean_abs_logit_diff" in stats else ""
    return (f"verify: {consumer} loads {path} and agrees with lowbit's model on {100 * stats['top1_agreement']:.1f}% "
            f"of {stats['positions']} held-out next tokens{diff}")
