"""GPTQ on one layer: lowbit against llm-compressor's GPTQ, same weights, same Hessian, same machine.

    .venv/bin/python benchmarks/gptq_layer.py                      # W 4096x4096 and 11008x4096, int4 g128
    .venv/bin/python benchmarks/gptq_layer.py --shapes 4096x11008 --repeats 1

Shapes are OUTxIN of W [out, in]: 4096x4096 is Llama-7B's q_proj, 11008x4096 its up_proj (nn.Linear(4096,
11008)), 4096x11008 its down_proj (whose Hessian is 11008 x 11008; about 15 minutes on 2 cores).
The Hessian is H = 2/n X^T X of n = 128 x 2048 tokens of
synthetic correlated activations X = Z M (Z standard normal; M mixes channels and gives them log-normal
energies with a few outlier channels). Z^T Z is drawn directly from its Wishart distribution (Bartlett's
decomposition; its chi^2 diagonal with about 2.6e5 degrees of freedom taken in the normal approximation),
which saves the n x in^2 flops of forming X^T X.

llm-compressor is installed from PyPI into benchmarks/.venv-llmcompressor (created on first use: the
pinned CPU torch first, then llmcompressor, after a dry run shows it leaves torch alone). It never
becomes a lowbit dependency. Its `quantize_weight` runs there in a subprocess on the same W and H,
with the scales of its own weight observer (static groups: llm-compressor computes group scales before
the column loop; its default activation ordering, "static", is act-order with those static groups).
Pairs compared (same schedule on both sides), each timed best of --repeats, alternating:

    lowbit gptq-int4-g128-static          vs  llm-compressor actorder=None
    lowbit gptq-int4-g128-actorder-static vs  llm-compressor actorder="weight" (its default)
    lowbit gptq-int4-g128 / -actorder     (the paper's dynamic groups; no llm-compressor counterpart since
                                           it dropped dynamic groups) vs the same llm-compressor runs

Output error is tr((W - Q) H (W - Q)^T) in float64, the quantity GPTQ minimises (n/2 x ||X W^T - X Q^T||^2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PEER_VENV = HERE / ".venv-llmcompressor"
PEER_PY = PEER_VENV / "bin" / "python"
TORCH_PIN = "torch==2.13.0"
TOKENS = 128 * 2048


# ---------------------------------------------------------------------------------------------------
# The problem

def wishart_gram(n_features: int, n_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """A draw of Z^T Z for Z [n_tokens, n_features] standard normal, as A A^T with A lower triangular:
    A_ii = sqrt(chi^2 with n_tokens - i degrees of freedom), A_ij ~ N(0, 1) below the diagonal."""
    a = torch.randn(n_features, n_features, generator=gen, dtype=torch.float64).tril_(-1)
    dof = torch.arange(n_tokens, n_tokens - n_features, -1, dtype=torch.float64)
    a.diagonal().copy_(_chi2(dof, gen).sqrt())
    return a


def _chi2(dof: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # For dof ~ 2.6e5 the chi^2 law is normal to within 1e-3 relative skew: dof + sqrt(2 dof) N(0, 1).
    return dof + torch.sqrt(2 * dof) * torch.randn(dof.shape, generator=gen, dtype=torch.float64)


def synthetic_layer(out_features: int, in_features: int, seed: int = 0, tokens: int = TOKENS):
    """(W [out, in] float32, H [in, in] float32): Gaussian weights (std 0.02) and the Hessian of
    correlated activations with log-normal channel energies and 0.5% outlier channels (x20)."""
    gen = torch.Generator().manual_seed(seed)
    n = in_features
    energy = torch.exp(0.5 * torch.randn(n, generator=gen, dtype=torch.float64))
    outliers = torch.randperm(n, generator=gen)[: max(1, n // 200)]
    energy[outliers] *= 20
    mix = torch.eye(n, dtype=torch.float64).add_(torch.randn(n, n, generator=gen, dtype=torch.float64),
                                                   alpha=0.5 / math.sqrt(n))
    m = mix.mul_(energy)                       # x = z @ M: channel j = energy_j * (z_j + mixed others)
    a = wishart_gram(n, tokens, gen)           # Z^T Z = A A^T
    b = a.T.float() @ m.float()                # X^T X = M^T A A^T M = B^T B (float32 products: fast)
    h = (b.T @ b).mul_(2.0 / tokens)
    w = 0.02 * torch.randn(out_features, in_features, generator=gen)
    return w, h.float()


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (w.double() - q.double())
    return float(((d @ h.double()) * d).sum())


# ---------------------------------------------------------------------------------------------------
# lowbit

def time_lowbit(w, h, config, repeats: int):
    from lowbit.methods.gptq import gptq_quantize

    best, qt = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        qt = gptq_quantize(w, h, config)
        best = min(best, time.perf_counter() - t)
    return best, qt.dequantize()


# ---------------------------------------------------------------------------------------------------
# llm-compressor, in its own virtual environment

PEER_SCRIPT = r'''
import json, sys, time
import torch
from safetensors.torch import load_file, save_file
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.observers import Observer
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

torch.set_num_threads(int(sys.argv[3]))
job = json.loads(sys.argv[2])
t = load_file(sys.argv[1])
w, h = t["w"], t["h"]
out = {}
for name, spec in job["runs"].items():
    args = QuantizationArgs(num_bits=spec["bits"], type="int", symmetric=spec["symmetric"], strategy="group",
                            group_size=spec["group_size"], actorder=spec["actorder"])
    best = float("inf")
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
        observer(w)
        qp = observer.get_qparams()
        q, losses, fallback = quantize_weight(w[None].clone(), h[None].clone(), qp["scale"][None],
                                              qp["zero_point"][None], None, args, blocksize=128, percdamp=0.01)
        best = min(best, time.perf_counter() - t0)
    out[name] = q[0].contiguous()
    out[name + ".seconds"] = torch.tensor(best, dtype=torch.float64)
    out[name + ".rtn_fallback"] = fallback.to(torch.uint8)
save_file(out, sys.argv[4])
'''


def ensure_peer_venv() -> None:
    """Create the llm-compressor venv once: pinned CPU torch, then llmcompressor if a dry run shows it
    would not touch torch."""
    if PEER_PY.exists():
        return
    print(f"creating {PEER_VENV} (one-off) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(PEER_PY), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    dry = subprocess.run([str(PEER_PY), "-m", "pip", "install", "--dry-run", "llmcompressor"],
                         check=True, capture_output=True, text=True).stdout
    would = next((line for line in dry.splitlines() if line.startswith("Would install")), "")
    if any(word.startswith("torch-") for word in would.split()):
        raise SystemExit(f"llmcompressor would replace the pinned torch ({would}); not installing it")
    subprocess.run(pip + ["llmcompressor"], check=True)


def run_peer(w, h, runs: dict, repeats: int, threads: int) -> dict:
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        save_file({"w": w.contiguous(), "h": h.contiguous()}, src)
        job = json.dumps({"runs": runs, "repeats": repeats})
        env = dict(os.environ, PYTHONWARNINGS="ignore", LOGURU_LEVEL="ERROR")
        subprocess.run([str(PEER_PY), "-c", PEER_SCRIPT, src, job, str(threads), dst], check=True, env=env)
        return load_file(dst)


def peer_version() -> str:
    out = subprocess.run([str(PEER_PY), "-c", "import importlib.metadata as m; print(m.version('llmcompressor'),"
                          " m.version('compressed-tensors'), m.version('torch'))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return f"llmcompressor {out[0]}, compressed-tensors {out[1]}, torch {out[2]}"


# ---------------------------------------------------------------------------------------------------

def bench_shape(out_f: int, in_f: int, args) -> list[dict]:
    from lowbit.methods.gptq import GPTQ, round_to_nearest

    t = time.perf_counter()
    w, h = synthetic_layer(out_f, in_f, seed=args.seed)
    print(f"\nW [{out_f}, {in_f}] (out x in), H from {TOKENS} tokens, built in {time.perf_counter() - t:.1f} s",
          flush=True)
    # min-max group ranges on both sides (lowbit's default clipping search has no llm-compressor counterpart)
    common = dict(bits=args.bits, group_size=args.group_size, symmetric=not args.asym, clip=False)
    pairs = [  # (label, lowbit config, llm-compressor actorder)
        ("static groups", GPTQ(static_groups=True, **common), "none"),
        ("act-order, static groups", GPTQ(act_order=True, static_groups=True, **common), "weight"),
        ("dynamic groups (paper)", GPTQ(**common), "none"),
        ("act-order, dynamic groups (paper)", GPTQ(act_order=True, **common), "weight"),
    ]
    runs = {name: {"bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym,
                   "actorder": None if name == "none" else name} for name in ("none", "weight")}
    ours = {label: (math.inf, None) for label, _, _ in pairs}
    theirs = {}
    for _ in range(args.repeats):   # alternate the two libraries so that load on the machine hits both
        if not args.skip_peer:
            got = run_peer(w, h, runs, 1, args.threads)
            for name in runs:
                s = float(got[f"{name}.seconds"])
                if name not in theirs or s < theirs[name][0]:
                    theirs[name] = (s, got[name], bool(got[f"{name}.rtn_fallback"].any()))
        for label, cfg, _ in pairs:
            s, q = time_lowbit(w, h, cfg, 1)
            if s < ours[label][0]:
                ours[label] = (s, q)
    rtn_err = output_error(w, round_to_nearest(w, pairs[0][1]).dequantize(), h)
    print(f"  round to nearest (same grid): err {rtn_err:.5g}")
    rows = []
    for label, cfg, peer_name in pairs:
        seconds, q = ours[label]
        row = {"shape": f"{out_f}x{in_f}", "schedule": label, "lowbit": cfg.short_name(), "lowbit_s": seconds,
               "lowbit_err": output_error(w, q, h), "rtn_err": rtn_err, "threads": args.threads}
        if peer_name in theirs:
            ps, pq, fallback = theirs[peer_name]
            row.update(peer_s=ps, peer_err=output_error(w, pq, h), peer_rtn_fallback=fallback,
                       peer=f"actorder={'None' if peer_name == 'none' else peer_name}")
            row.update(time_ratio=row["lowbit_s"] / row["peer_s"], err_ratio=row["lowbit_err"] / row["peer_err"])
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    s = f"  {r['schedule']:<34} lowbit {r['lowbit_s']:7.2f} s  err {r['lowbit_err']:.5g}"
    if "peer_s" in r:
        s += (f" | llm-compressor ({r['peer']}) {r['peer_s']:7.2f} s  err {r['peer_err']:.5g}"
              f" | time ratio {r['time_ratio']:.2f}  error ratio {r['err_ratio']:.4f}")
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096",
                   help="comma-separated OUTxIN of W: 4096x4096 q_proj, 11008x4096 up_proj (nn.Linear(4096, 11008)), "
                        "4096x11008 down_proj (H 11008 x 11008; about 15 minutes more)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--asym", action="store_true", help="asymmetric (zero point) instead of symmetric")
    p.add_argument("--repeats", type=int, default=2, help="best of N timings per run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on both sides (default 1: on a shared 2-core machine, waiting threads "
                        "distort timings far more than the second core helps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-peer", action="store_true", help="lowbit only (no llm-compressor venv)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.skip_peer:
        ensure_peer_venv()
        print(f"peer: {peer_version()}; threads: {args.threads}")
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(x) for x in shape.lower().split("x"))
        rows += bench_shape(out_f, in_f, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
