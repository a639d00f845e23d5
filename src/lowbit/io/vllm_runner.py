"""Runs inside the vLLM environment (`make test-serving` makes `.venv-serving`): loads each model folder
named in a job file with vLLM's CPU build and writes, per model, the top-1 next token at every position of the given
token windows (teacher-forced: prompt logprobs) and a short greedy continuation of each window's start, with
the two most likely tokens at each generated step (so that a divergence can be told apart from a near-tie).

    python vllm_runner.py JOB.json OUT.json        JOB: {"models": {name: path}, "windows": [[ids]],
                                                         "prompts": [[ids]], "max_tokens": n}
This file imports nothing from lowbit (it runs with another environment's Python): lowbit export --verify
and tests/serving use it as the independent consumer."""
from __future__ import annotations

import json
import os
import sys

# Python puts this file's folder first on sys.path; it holds lowbit's own gguf.py and compressed_tensors.py,
# which would shadow the packages of the same names that vLLM imports.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def top1_per_position(prompt_logprobs) -> list[int]:
    """The rank-1 token predicted at each position after the first (vLLM's prompt logprobs)."""
    out = []
    for entry in prompt_logprobs[1:]:
        out.append(next(tok for tok, lp in entry.items() if lp.rank == 1))
    return out


def top2_per_step(logprobs) -> list[list[list]]:
    """[[token, logprob] of rank 1, the same of rank 2] at each generated step (vLLM's sample logprobs, which
    also hold the sampled token whatever its rank)."""
    return [[[tok, lp.logprob] for tok, lp in sorted(entry.items(), key=lambda kv: kv[1].rank) if lp.rank <= 2]
            for entry in logprobs]


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    results = {}
    for name, path in job["models"].items():
        llm = LLM(model=path, dtype="bfloat16", max_model_len=job.get("max_model_len", 256), enforce_eager=True,
                  max_num_seqs=4, seed=0)
        scored = llm.generate([TokensPrompt(prompt_token_ids=w) for w in job["windows"]],
                              SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
        greedy = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]],
                              SamplingParams(temperature=0, max_tokens=job.get("max_tokens", 16), logprobs=2))
        results[name] = {"top1": [top1_per_position(o.prompt_logprobs) for o in scored],
                         "greedy": [list(o.outputs[0].token_ids) for o in greedy],
                         "greedy_top2": [top2_per_step(o.outputs[0].logprobs) for o in greedy]}
        del llm
    return results


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    with open(sys.argv[2], "w") as f:
        json.dump(run(job), f)


if __name__ == "__main__":
    main()
