"""Decode speed on a model large enough to be memory-bound: lowbit's formats and llama.cpp on the same weights.

    .venv/bin/python benchmarks/decode.py                          # every row, 2 threads
    .venv/bin/python benchmarks/decode.py --rows fp32,rtn-int4-g128,llama.cpp-Q4_0 --tokens 32

The model is benchmarks/llama038b.py's random-initialised 0.38B Llama. Rows:
  lowbit fp32 / bf16           the float model (bf16: every weight and activation in bfloat16)
  lowbit rtn-int8, rtn-int4-g128, nf4    lowbit.quantize(model, name): QuantLinear / Linear4bit modules,
                               the output head kept in float32 (lowbit's default recipe)
  lowbit Q4_0, Q4_K_M          the very GGUF files llama.cpp runs (llama-quantize's output), loaded by
                               lowbit (GGMLLinear, output head included): the same bytes on both sides
  llama.cpp F16, Q4_0, Q4_K_M  llama-cpp-python on lowbit's F16 export and llama-quantize's files
Protocol: batch 1, --threads for torch and llama.cpp alike, a --prompt-token prompt, then --tokens single-
token steps with the KV cache (lowbit: greedy, through transformers; llama.cpp: llama_decode of the same
token ids); the median over --repeats, rows interleaved so that load on the machine falls on all of them.
Effective GB/s = bytes of every weight but the token embedding (what one step reads) x tokens/s; the
read bandwidth of a 1 GiB buffer is measured in the same run. "Overhead" is the same decode with every
Linear replaced by a stub returning zeros: the per-token time outside the matmuls (attention, norms,
rotary, sampling and transformers' Python), the same for every lowbit row.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama038b

LOWBIT_QUANT = ("rtn-int8", "rtn-int4-g128", "nf4")
ROWS = ("fp32", "bf16", *LOWBIT_QUANT, "Q4_0", "Q4_K_M", "llama.cpp-F16", "llama.cpp-Q4_0", "llama.cpp-Q4_K_M")


class Stub(nn.Module):
    """A Linear that costs nothing: zeros of the output shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def stubbed(model: nn.Module) -> nn.Module:
    from lowbit.pipeline.loading import set_module

    lin = [(n, m) for n, m in model.named_modules() if hasattr(m, "out_features") and not isinstance(m, Stub)]
    for name, m in lin:
        set_module(model, name, Stub(m.out_features))
    return model


class LowbitRow:
    def __init__(self, model, prompt: list[int]):
        self.model, self.prompt = model, torch.tensor([prompt])

    def seconds(self, n: int) -> float:
        from lowbit.eval.speed import _decode

        return _decode(self.model, self.prompt, n)

    def close(self):
        self.model = None


class LlamaCppRow:
    def __init__(self, path: Path, prompt: list[int], threads: int, n_tokens: int):
        lc = llama038b.llama_cpp()
        self.llm = lc.Llama(model_path=str(path), n_ctx=len(prompt) + n_tokens + 8, n_batch=64, n_threads=threads,
                            n_threads_batch=threads, verbose=False)
        self.prompt = prompt

    def seconds(self, n: int) -> float:
        self.llm.reset()
        self.llm.eval(self.prompt)
        token = self.prompt[-1]
        start = time.perf_counter()
        for _ in range(n):
            self.llm.eval([token])
        return time.perf_counter() - start

    def close(self):
        self.llm.close()


def build_rows(names, model, tok, files, prompt, args) -> tuple[dict, dict]:
    """(name -> runner, name -> weight bytes read per token)."""
    import lowbit

    rows, nbytes = {}, {}
    for name in names:
        if name.startswith("llama.cpp-"):
            path = files[name.removeprefix("llama.cpp-")]
            rows[name], nbytes[name] = LlamaCppRow(path, prompt, args.threads, args.tokens), llama038b.gguf_weight_bytes(path)
            continue
        if name == "fp32":
            m = model
        elif name == "bf16":
            m = copy.deepcopy(model).to(torch.bfloat16)
        elif name in ("Q4_0", "Q4_K_M"):
            m, _ = lowbit.load(files[name])
        else:
            m = copy.deepcopy(model)
            lowbit.quantize(m, name, progress=False)
        rows[name], nbytes[name] = LowbitRow(m.eval(), prompt), llama038b.model_weight_bytes(m)
        gc.collect()
    return rows, nbytes


def read_bandwidth(threads: int) -> float:
    buf = torch.randn(1 << 28)
    buf.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.numel() * 4 / statistics.median(times)


def measure(rows: dict, args) -> dict:
    samples = {name: [] for name in rows}
    with torch.inference_mode():
        for r in rows.values():
            r.seconds(2)            # warm-up: plans, allocations, llama.cpp's graph
        for _ in range(args.repeats):
            for name, r in rows.items():
                samples[name].append(args.tokens / r.seconds(args.tokens))
    return {name: statistics.median(v) for name, v in samples.items()}


def overhead_tokens_per_s(model, prompt, args) -> float:
    stub = stubbed(copy.deepcopy(model))
    row = LowbitRow(stub, prompt)
    with torch.inference_mode():
        row.seconds(2)
        return statistics.median(args.tokens / row.seconds(args.tokens) for _ in range(args.repeats))


def table(speeds: dict, nbytes: dict, bandwidth: float, overhead: float | None) -> list[dict]:
    fp32 = speeds.get("fp32")
    ref = speeds.get("llama.cpp-Q4_0")
    out = []
    for name, tps in speeds.items():
        gbps = nbytes[name] * tps
        out.append({"row": name, "tokens_per_s": tps, "weight_MB": nbytes[name] / 1e6, "GBps": gbps / 1e9,
                    "of_bandwidth": gbps / bandwidth, "x_fp32": tps / fp32 if fp32 else None,
                    "x_llamacpp_q4_0": tps / ref if ref else None})
    print("| row | tokens/s | weights read per token, MB | effective GB/s | of read bandwidth | x lowbit fp32 | x llama.cpp Q4_0 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in out:
        xf = f"{r['x_fp32']:.2f}" if r["x_fp32"] else "-"
        xq = f"{r['x_llamacpp_q4_0']:.2f}" if r["x_llamacpp_q4_0"] else "-"
        print(f"| {r['row']} | {r['tokens_per_s']:.1f} | {r['weight_MB']:.0f} | {r['GBps']:.1f} | "
              f"{r['of_bandwidth']:.0%} | {xf} | {xq} |")
    print(f"\nread bandwidth (sum over 1 GiB, same run): {bandwidth / 1e9:.1f} GB/s")
    if overhead:
        print(f"per-token time outside the matmuls (every Linear a stub): {1e3 / overhead:.2f} ms "
              f"({overhead:.0f} tokens/s if the matmuls were free)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32, help="decode steps per timing")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache", default="out/bench-0.38b", help="folder for the GGUF files (reused)")
    p.add_argument("--no-overhead", action="store_true", help="skip the stubbed-matmul overhead measurement")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lowbit.kernels import native

    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    model, tok = llama038b.build()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters; lowbit kernels: "
          f"{native.isa() or native.unavailable_reason()}; {args.threads} threads", flush=True)
    need = {n.removeprefix("llama.cpp-") for n in names if n.startswith("llama.cpp-") or n in ("Q4_0", "Q4_K_M")}
    files = llama038b.gguf_files(model, tok, Path(args.cache), tuple(need) or ("F16",), args.threads) if need else {}
    prompt = tok("The quick brown fox jumps over the lazy dog, and then")["input_ids"][: args.prompt_tokens]
    rows, nbytes = build_rows(names, model, tok, files, prompt, args)
    speeds = measure(rows, args)
    overhead = None if args.no_overhead else overhead_tokens_per_s(model, prompt, args)
    out = table(speeds, nbytes, read_bandwidth(args.threads), overhead)
    for r in rows.values():
        r.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": out, "overhead_tokens_per_s": overhead,
                                               "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
