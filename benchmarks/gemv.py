"""Every kernel on one matrix-vector product (batch 1, the decoding step), against the memory bandwidth
measured in the same run.

    .venv/bin/python benchmarks/gemv.py                              # 4096x4096 and 4096x11008, 2 threads
    .venv/bin/python benchmarks/gemv.py --shapes 11008x4096 --threads 1 --json out/gemv.json

Shapes are OUTxIN of W [out, in] (4096x11008 is Llama-7B's down_proj). Per kernel: the median over
--repeats of the mean time of --iters calls (kernels interleaved, so load on the machine falls on all),
the bytes the weight is stored in (codes, scales, zeros; what one call must read), GB/s = bytes / time,
and that as a fraction of the read bandwidth of the same number of bytes measured the same way in the
same run (`stream`: torch's sum over a float32 buffer of that size; a weight read again and again sits in
the same cache level as that buffer) and of a 1 GiB buffer (DRAM). The rows:
  fp32 / bf16:        torch's own matmul (F.linear) on the float weight
  torch int8 / int4:  torch's CPU weight-only ops (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu)
  python int4-g128:   lowbit's old path (dequantise the whole weight, then F.linear)
  everything else:    lowbit's fused kernels (lowbit.kernels.fused) through the module that holds the weight
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

GGML_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def module_bytes(m) -> int:
    tensors = list(m.buffers()) + [p for p in m.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors)


def torch_int8(w: torch.Tensor):
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    return (lambda x: torch._weight_int8pack_mm(x, q, scale)), q.numel() + scale.numel() * 4


def torch_int4(w: torch.Tensor):
    n, k = w.shape
    g = w.reshape(n, k // 128, 128)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    q = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zeros = lo + 8 * scale           # torch's convention: w = (q - 8) * scale + zero
    sz = torch.stack([scale.T, zeros.T], -1).contiguous()
    fn = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz)
    return fn, packed.numel() * packed.element_size() + sz.numel() * 4


def lowbit_rows(w: torch.Tensor) -> dict:
    """name -> (callable on x, weight bytes)."""
    from lowbit.core import QuantSpec, quantize
    from lowbit.methods.nf4 import quantize_4bit
    from lowbit.nn import GGMLLinear, Linear4bit, QuantLinear
    from lowbit.weights.ggml import quantize_to_tensor

    rows = {}
    specs = {"int8 (channel)": QuantSpec("int8"), "int4-g128": QuantSpec("int4", "group", 128),
             "uint4-g128 asym": QuantSpec("uint4", "group", 128, symmetric=False),
             "int4-g32": QuantSpec("int4", "group", 32)}
    for name, spec in specs.items():
        m = QuantLinear.from_quantized(quantize(w, spec))
        rows[name] = (m, module_bytes(m))
        if name == "int4-g128":
            rows["python int4-g128"] = (m.python_forward, module_bytes(m))
    for name, dq, dtype in (("nf4 (bf16 compute)", False, torch.bfloat16), ("nf4 (fp32 compute)", False, torch.float32),
                            ("nf4-dq (bf16 compute)", True, torch.bfloat16)):
        m = Linear4bit.from_quantized(quantize_4bit(w, 64, "nf4", dq), None, dtype)
        rows[name] = (m, module_bytes(m))
    for t in GGML_TYPES:
        m = GGMLLinear.from_tensor(quantize_to_tensor(w, t, search=False))
        rows[t] = (m, module_bytes(m))
    return rows


def all_rows(w: torch.Tensor) -> dict:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    lin16 = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(torch.bfloat16)
    lin16.weight.data = w.to(torch.bfloat16)
    rows = {"fp32 (torch)": (lin, w.numel() * 4), "bf16 (torch)": (lambda x: lin16(x.to(torch.bfloat16)), w.numel() * 2),
            "int8 (torch _weight_int8pack_mm)": torch_int8(w), "int4-g128 (torch _weight_int4pack_mm)": torch_int4(w)}
    rows.update(lowbit_rows(w))
    return rows


def mean_seconds(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def bench_shape(out_f: int, in_f: int, args) -> list[dict]:
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.02
    x = torch.randn(1, in_f)
    rows = all_rows(w)
    streams = {}
    for _, nbytes in rows.values():
        streams.setdefault(nbytes, torch.randn(nbytes // 4))
    dram = torch.randn(1 << 28)
    samples = {name: [] for name in rows}
    stream_s = {b: [] for b in streams}
    dram_s = []
    with torch.inference_mode():
        for name, (fn, _) in rows.items():    # warm-up: plans, first-call allocations
            fn(x)
        for _ in range(args.repeats):
            for name, (fn, _) in rows.items():
                samples[name].append(mean_seconds(lambda fn=fn: fn(x), args.iters))
            for b, buf in streams.items():
                stream_s[b].append(mean_seconds(buf.sum, args.iters))
            dram_s.append(mean_seconds(dram.sum, 3))
    dram_bw = dram.numel() * 4 / statistics.median(dram_s)
    fp32_s = statistics.median(samples["fp32 (torch)"])
    out = []
    for name, (_, nbytes) in rows.items():
        s = statistics.median(samples[name])
        stream_bw = nbytes / statistics.median(stream_s[nbytes])
        out.append({"shape": f"{out_f}x{in_f}", "kernel": name, "us": s * 1e6, "bytes": nbytes,
                    "GBps": nbytes / s / 1e9, "stream_GBps": stream_bw / 1e9, "of_stream": nbytes / s / stream_bw,
                    "dram_GBps": dram_bw / 1e9, "of_dram": nbytes / s / dram_bw, "speedup_vs_fp32": fp32_s / s,
                    "threads": args.threads})
    return out


def print_table(rows: list[dict]) -> None:
    print("| W [out, in] | kernel | us | weight MB | GB/s | stream GB/s (same bytes) | of stream | of DRAM | x fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['kernel']} | {r['us']:.0f} | {r['bytes'] / 1e6:.2f} | {r['GBps']:.1f} | "
              f"{r['stream_GBps']:.1f} | {r['of_stream']:.0%} | {r['of_dram']:.0%} | {r['speedup_vs_fp32']:.2f} |")
    if rows:
        print(f"\nDRAM read bandwidth (sum over 1 GiB, same run): {rows[0]['dram_GBps']:.1f} GB/s; "
              f"threads: {rows[0]['threads']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x4096,4096x11008", help="comma-separated OUTxIN of W")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="median over this many rounds")
    p.add_argument("--iters", type=int, default=20, help="calls per timing")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lowbit.kernels import native

    print(f"lowbit kernels: {native.isa() or native.unavailable_reason()}; torch {torch.__version__}, "
          f"{args.threads} threads")
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        rows += bench_shape(out_f, in_f, args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
