"""KV-cache quantisation on the bundled model: perplexity read through the cache over its full context,
live cache memory at 4K and 32K tokens beside the calculator, and decode tokens/s, fp16 cache as baseline.

    .venv/bin/python benchmarks/kv_cache.py                      # the README's table (~10 min, 2 threads)
    .venv/bin/python benchmarks/kv_cache.py --max-eval-tokens 4096 --schemes fp16,int4

The same measurement as `lowbit kv-cache --context 512 --max-eval-tokens 1000000`, printed as Markdown.
Perplexity is scored token by token (each prediction attends to the quantised past, as in decoding).
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default="fp16,int8,int4,fp8,int2")
    p.add_argument("--context", type=int, default=512, help="window (default 512, the bundled model's context)")
    p.add_argument("--max-eval-tokens", type=int, default=10 ** 6)
    p.add_argument("--memory-tokens", default="4096,32768")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lowbit import api
    from lowbit.eval.evaluate import eval_windows
    from lowbit.eval.kv import kv_report, parse_kv_schemes, render_kv_report

    model, tok = api.load_model(None)
    windows = eval_windows(model, tok, context=args.context, max_eval_tokens=args.max_eval_tokens)
    tokens = tuple(int(t) for t in args.memory_tokens.split(","))
    rows = kv_report(model, windows.ids.reshape(-1), parse_kv_schemes(args.schemes), windows.context, tokens)
    print(render_kv_report(rows, tokens, markdown=True))


if __name__ == "__main__":
    main()
