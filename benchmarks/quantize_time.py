"""How long quantising takes: every method on the bundled model, and the k-quants against llama.cpp's quantiser.

    .venv/bin/python benchmarks/quantize_time.py                          # both parts, 2 threads
    .venv/bin/python benchmarks/quantize_time.py --part methods --samples 32
    .venv/bin/python benchmarks/quantize_time.py --part kquants --types Q4_K_M,Q6_K --layers 2

Part "methods": lowbit.quantize on a copy of the bundled model (data/lowbit-tiny-llama, 5.2M parameters)
for every method, with --samples calibration windows (32, as `make demo`), wall and CPU seconds.
Part "kquants": GGUF file types on the weights of benchmarks/llama038b.py's model (its first --layers
blocks: the same 2048/5632 shapes), written three ways from the same F16 file's weights: llama.cpp's
quantiser (llama-quantize through llama-cpp-python), lowbit's `search=False` (llama-quantize's algorithm)
and lowbit's default search. Reported: seconds, weights per second, throughput relative to llama.cpp,
and the relative squared error sum ||W - W_hat||^2 / sum ||W||^2 over the quantised tensors.
GPTQ against llm-compressor has its own benchmark: gptq_layer.py (same weights, same Hessian).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama038b

METHODS = ("rtn-int8", "rtn-int4-g128", "gptq-int4-g128", "awq-int4-g128", "nf4", "nf4-dq", "fp4", "q4_k_m",
           "q4_k_m-ref", "q4_k_m-imatrix", "q6_k", "q8_0", "smoothquant", "w8a8", "llm-int8")


def time_methods(names, samples: int) -> list[dict]:
    import lowbit
    from lowbit.eval.compare import needs_calibration
    from lowbit.methods import parse_method

    base, tok = lowbit.load_model()
    rows = []
    for name in names:
        model = copy.deepcopy(base)
        config = parse_method(name)
        calibrated = needs_calibration(config)
        wall, cpu = time.perf_counter(), time.process_time()
        lowbit.quantize(model, config, tokenizer=tok if calibrated else None, n_samples=samples, progress=False)
        row = {"method": name, "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
               "calibration_windows": samples if calibrated else 0}
        rows.append(row)
        print(f"| {name} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | {row['calibration_windows']} |", flush=True)
    return rows


def relative_error(reference: Path, quantised: Path) -> tuple[float, int]:
    """sum ||W - W_hat||^2 / sum ||W||^2 over the 2-D tensors that `quantised` holds in a block type, and
    how many weights they have."""
    from gguf import GGMLQuantizationType, GGUFReader

    from lowbit.weights.ggml import BLOCK_TYPES, dequantize_ggml

    ref = {t.name: t for t in GGUFReader(reference).tensors}
    num = den = 0.0
    count = 0
    for t in GGUFReader(quantised).tensors:
        kind = GGMLQuantizationType(t.tensor_type).name
        if kind not in BLOCK_TYPES or t.name == "token_embd.weight":
            continue
        cols = int(t.shape[0])
        w_hat = dequantize_ggml(torch.from_numpy(t.data.copy()).reshape(-1, t.data.shape[-1]), kind, cols)
        w = torch.from_numpy(ref[t.name].data.copy()).float().reshape(w_hat.shape)
        num += float(((w - w_hat).double() ** 2).sum())
        den += float((w.double() ** 2).sum())
        count += w.numel()
    return num / den, count


def time_kquants(types, layers: int, threads: int, folder: Path) -> list[dict]:
    from lowbit.io.gguf import export_gguf

    llama038b.CONFIG["num_hidden_layers"] = layers
    model, tok = llama038b.build()
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / f"kq-{layers}-F16.gguf"
    if not f16.exists():
        export_gguf(model, f16, tokenizer=tok, type="F16")
    rows = []
    for t in types:
        runs = {"llama.cpp": lambda p, t=t: llama038b.llama_quantize(f16, p, t, threads)}
        for label, search in (("lowbit search=False", False), ("lowbit (default search)", True)):
            runs[label] = lambda p, s=search, t=t: _timed(lambda: export_gguf(model, p, tokenizer=tok, type=t, search=s))
        base = None
        for label, run in runs.items():
            path = folder / f"kq-{layers}-{t}-{label.split()[0]}-{label.endswith(')') or 'ref'}.gguf"
            seconds = run(path)
            err, n = relative_error(f16, path)
            base = base or seconds
            row = {"type": t, "quantiser": label, "seconds": seconds, "weights": n, "Mweights_per_s": n / seconds / 1e6,
                   "throughput_vs_llamacpp": base / seconds, "relative_error": err, "threads": threads}
            rows.append(row)
            print(f"| {t} | {label} | {seconds:.1f} | {row['Mweights_per_s']:.1f} | {row['throughput_vs_llamacpp']:.2f} | "
                  f"{err:.4e} |", flush=True)
    return rows


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("methods", "kquants", "both"), default="both")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--samples", type=int, default=32, help="calibration windows (as `make demo`)")
    p.add_argument("--types", default="Q4_K_M,Q6_K,Q4_0", help="GGUF file types for the k-quant part")
    p.add_argument("--layers", type=int, default=2, help="blocks of the 0.38B model in the k-quant part")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="out/bench-quantize", help="folder for the GGUF files")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads}
    if args.part in ("methods", "both"):
        print(f"lowbit.quantize on the bundled model, {args.threads} threads\n")
        print("| method | seconds | CPU seconds | calibration windows |\n|---|---:|---:|---:|")
        out["methods"] = time_methods(args.methods.split(","), args.samples)
    if args.part in ("kquants", "both"):
        print(f"\nGGUF file types on the 0.38B model's first {args.layers} blocks, {args.threads} threads\n")
        print("| type | quantiser | seconds | M weights/s | throughput vs llama.cpp | relative error |")
        print("|---|---|---:|---:|---:|---:|")
        out["kquants"] = time_kquants(args.types.split(","), args.layers, args.threads, Path(args.cache))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
