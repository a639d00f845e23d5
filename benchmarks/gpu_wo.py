"""The Triton weight-only 4-bit kernel on a GPU against torch's float16 matmul on the same device.

    .venv/bin/python benchmarks/gpu_wo.py                        # 4096x4096 and 4096x11008, batch 1 and 16
    .venv/bin/python benchmarks/gpu_wo.py --shapes 4096x4096 --rows 1 --json out/gpu_wo.json

Shapes are OUTxIN of W [out, in]. Rows per shape: torch fp16 (F.linear on the float16 weight), lowbit
int4-g128 (QuantLinear, symmetric, fp16 scales) and lowbit nf4 (Linear4bit, blocks of 64, fp16 compute),
both through lowbit.kernels.triton_wo on CUDA tensors; the median of --repeats timings of --iters calls
(CUDA events), GB/s of the weight's stored bytes, and the ratio to fp16. Also checked on every row: the
output against the module's Python path (max relative error). Needs a CUDA device and the triton package;
otherwise it says so in one line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def timed(fn, iters: int, repeats: int) -> float:
    """Median seconds per call."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def stored_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()))


def rows_for(out_f: int, in_f: int, rows: int, args) -> list[dict]:
    from lowbit.core import QuantSpec, quantize
    from lowbit.methods.nf4 import quantize_4bit
    from lowbit.nn import Linear4bit, QuantLinear

    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.02
    x = torch.randn(rows, in_f, device="cuda", dtype=torch.float16)
    fp16 = w.half().cuda()
    mods = {"int4-g128": QuantLinear.from_quantized(quantize(w, QuantSpec("int4", "group", 128))),
            "nf4": Linear4bit.from_quantized(quantize_4bit(w, 64, "nf4", False), None, torch.float16)}
    base = timed(lambda: torch.nn.functional.linear(x, fp16), args.iters, args.repeats)
    out = [{"shape": f"{out_f}x{in_f}", "rows": rows, "kernel": "torch fp16", "seconds": base,
            "gbps": fp16.numel() * 2 / base / 1e9, "x_fp16": 1.0, "max_rel_err": 0.0}]
    with torch.no_grad():
        for name, m in mods.items():
            ref = m.python_forward(x.cpu()).to(x.device)   # the reference path, on the CPU
            m = m.cuda()
            y = m(x)
            if m._gpu_plan is False:
                raise SystemExit(f"lowbit: the Triton kernel did not take {name} (see lowbit.kernels.triton_wo)")
            t = timed(lambda m=m: m(x), args.iters, args.repeats)
            out.append({"shape": f"{out_f}x{in_f}", "rows": rows, "kernel": f"lowbit {name} (triton)", "seconds": t,
                        "gbps": stored_bytes(m) / t / 1e9, "x_fp16": base / t,
                        "max_rel_err": float((y.float() - ref.float()).abs().max() / ref.float().abs().max())})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x11008")
    p.add_argument("--rows", default="1,16", help="activation rows (batch x tokens) per call")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    from lowbit.kernels import triton_wo
    if not torch.cuda.is_available() or not triton_wo.available():
        print("gpu_wo: needs a CUDA device and the triton package (pip install triton)", file=sys.stderr)
        return 2
    table = []
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| W [out, in] | rows | kernel | us | GB/s | x fp16 | max rel err |\n|---|---:|---|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        for rows in (int(r) for r in args.rows.split(",")):
            for r in rows_for(out_f, in_f, rows, args):
                table.append(r)
                print(f"| {r['shape']} | {r['rows']} | {r['kernel']} | {r['seconds'] * 1e6:.1f} | {r['gbps']:.0f} | "
                      f"{r['x_fp16']:.2f} | {r['max_rel_err']:.1e} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
