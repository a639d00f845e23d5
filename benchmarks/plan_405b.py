"""`lowbit plan` on a Llama 3.1 405B-shaped folder whose shards are sparse files: real safetensors headers (the
planner reads nothing else), no weights, no disk used.

    .venv/bin/python benchmarks/plan_405b.py                     # gptq-int4-g128, 128 x 2048 calibration
    .venv/bin/python benchmarks/plan_405b.py --method rtn-int4-g128 --samples 0

Prints the plan (peak memory with and without --stream, disk, verdict on this machine). `lowbit plan`'s own
time probe is left out: it would run the method on the real 16384 x 53248 shapes, a Hessian of 53248^2 floats
(11 GB, three copies while solved). `--time` estimates GPTQ's time per block instead, from probes that fit:

    .venv/bin/python benchmarks/plan_405b.py --time --threads 2

  forward   every Linear's matmuls, 2 T in out flops per pass (T calibration tokens), and attention's 4 T L d, for
            the passes the block walk makes (one per sequential group of Linears to gather its statistics, one
            to move the activations on), at this machine's measured float32 GEMM rate
  stats     X^T X in float64 once per distinct input (q/k/v share one, gate/up one; o and down their own),
            2 T in^2 flops, at the measured float64 rate
  solve     GPTQ on each Linear: probed at the real input width 16384 with 512 and 2048 output rows (time is
            affine in the rows: T0(in) + rows * s(in)); for the 53248-wide down_proj T0 is scaled as in^3 (the
            Cholesky factorisation and inverse) and s as in^2 (each row's lazy-batch updates), GPTQ's costs
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
          "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
          "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def shapes(c: dict) -> dict[str, list]:
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // \
        c["num_attention_heads"]
    out = {"model.embed_tokens.weight": [c["vocab_size"], h], "model.norm.weight": [h], "lm_head.weight":
           [c["vocab_size"], h]}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h], p + "mlp.down_proj.weight": [h, i],
                p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}
    return out


def sparse_shard(path: Path, tensors: dict[str, list]) -> None:
    """A safetensors file with a true header and a hole where the bf16 data would be."""
    header, offset = {}, 0
    for name, shape in sorted(tensors.items()):
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def gemm_rate(dtype, n: int = 2048, repeats: int = 3) -> float:
    """Measured flop/s of an n x n x n matmul in `dtype` (best of `repeats`)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def solve_seconds(method: str, rows: int, width: int) -> float:
    """Seconds of `method` on a random [rows, width] weight with a Hessian from 256 random tokens."""
    import torch

    sys.path.insert(0, str(SRC))
    from lowbit import parse_method
    from lowbit.methods.stats import LayerStats

    torch.manual_seed(0)
    stats = LayerStats(width)
    stats.update(torch.randn(256, width))
    weight = torch.randn(rows, width) * 0.02
    return _seconds(lambda: parse_method(method).quantize_weight(weight, stats))


def solve_model(method: str, widths=(16384,), rows=(512, 2048)) -> dict:
    """{width: (T0, s)} from probes: solve time = T0(width) + rows * s(width)."""
    fit = {}
    for w in widths:
        t_small, t_large = (solve_seconds(method, r, w) for r in rows)
        s = max(t_large - t_small, 0.0) / (rows[1] - rows[0])
        fit[w] = (max(t_small - rows[0] * s, 0.0), s)
        print(f"  probe {method} width {w}: {t_small:.1f} s for {rows[0]} rows, {t_large:.1f} s for {rows[1]} rows",
              file=sys.stderr, flush=True)
    return fit


def extrapolate(fit: dict, width: int) -> tuple[float, float]:
    """(T0, s) at `width` from the widest probe: T0 grows as width^3, s as width^2 (GPTQ's costs)."""
    if width in fit:
        return fit[width]
    w1 = max(fit)
    t0, s = fit[w1]
    return t0 * (width / w1) ** 3, s * (width / w1) ** 2


def block_time(c: dict, tokens: int, seq_len: int, fp32: float, fp64: float, fit: dict) -> dict:
    """Seconds per block of the block walk, by phase, for GPTQ on `tokens` calibration tokens."""
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    linears = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (i, h),
               "up_proj": (i, h), "down_proj": (h, i)}
    passes = 4 + 1   # statistics for q/k/v, o, gate/up, down; then the pass that moves the activations on
    per_pass = sum(2 * tokens * o * n for o, n in linears.values()) + 4 * tokens * seq_len * h
    solve = {}
    for name, (out, width) in linears.items():
        t0, s = extrapolate(fit, width)
        solve[name] = t0 + out * s
    return {"forward": passes * per_pass / fp32,
            "stats": sum(2 * tokens * n * n for n in (h, h, h, i)) / fp64,   # q/k/v, o, gate/up, down
            "solve": sum(solve.values()), "solve_by_linear": solve}


def print_time(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    fp32, fp64 = gemm_rate(torch.float32), gemm_rate(torch.float64)
    print(f"this machine, {torch.get_num_threads()} threads: float32 GEMM {fp32 / 1e9:.0f} GFLOP/s, "
          f"float64 {fp64 / 1e9:.0f} GFLOP/s", flush=True)
    fit = solve_model(args.method)
    t = block_time(CONFIG, args.samples * args.seq_len, args.seq_len, fp32, fp64, fit)
    blocks = CONFIG["num_hidden_layers"]
    total = t["forward"] + t["stats"] + t["solve"]
    print(f"{args.method}, {args.samples} x {args.seq_len} tokens, per block: forward {t['forward'] / 3600:.2f} h, "
          f"X^T X {t['stats'] / 3600:.2f} h, solve {t['solve'] / 3600:.2f} h "
          f"({', '.join(f'{n} {v / 60:.1f} min' for n, v in t['solve_by_linear'].items())}); "
          f"total {total / 3600:.2f} h per block, {blocks * total / 86400:.1f} days for {blocks} blocks")
    print(json.dumps({"threads": torch.get_num_threads(), "fp32_flops": fp32, "fp64_flops": fp64,
                      "solve_fit": {str(k): v for k, v in fit.items()}, **t, "blocks": blocks}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="gptq-int4-g128")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--time", action="store_true", help="estimate time per block from probes (minutes)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.time:
        print_time(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        all_shapes = shapes(CONFIG)
        for n in range(CONFIG["num_hidden_layers"] + 1):
            prefix = f"model.layers.{n}." if n < CONFIG["num_hidden_layers"] else None
            part = {k: v for k, v in all_shapes.items()
                    if (k.startswith(prefix) if prefix else not k.startswith("model.layers."))}
            sparse_shard(folder / f"model-{n:05d}.safetensors", part)
        sizes = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)] if args.samples else []
        for extra in ([], ["--json"]):
            subprocess.run([sys.executable, "-m", "lowbit", "plan", str(folder), "--method", args.method, "--no-probe",
                            *sizes, *extra], env={**os.environ, "PYTHONPATH": str(SRC)}, check=True)


if __name__ == "__main__":
    main()
