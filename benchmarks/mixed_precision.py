"""Mixed precision under a budget against uniform schemes, on the bundled model: the Pareto table and plot.

    .venv/bin/python benchmarks/mixed_precision.py                    # the README's table (~20 min, 2 threads)
    .venv/bin/python benchmarks/mixed_precision.py --budgets 3.5,4.5 --uniform gptq-int3-g32,gptq-int4-g32

Every row is quantised by GPTQ (lowbit's default settings) on the same calibration windows and scored on
the same held-out windows against the same full-precision reference (lowbit.eval.compare's protocol).
Mixed rows: sensitivities measured once (pipeline/sensitivity.py: KL of rounding one Linear alone, 16
calibration windows), then one scheme per Linear chosen by the exact knapsack for each budget (bits per
weight over the quantised Linears). "beats" says whether the mix has lower perplexity than every uniform
row of equal or larger size. Writes mixed_precision.md and mixed_precision.png into --out.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

UNIFORM = "gptq-int2-g64,gptq-int3-g128,gptq-int3-g64,gptq-int3-g32,gptq-int4-g128,gptq-int4-g64,gptq-int4-g32"
CANDIDATES = "gptq-int2-g64,gptq-int3-g128,gptq-int3-g32,gptq-int4-g128,gptq-int4-g32,gptq-int8"


def evaluate_rows(base, tok, configs: dict, samples: int, reference) -> list[dict]:
    from lowbit.eval.compare import quantised_copy
    from lowbit.eval.evaluate import evaluate

    rows = []
    for name, config in configs.items():
        print(f"quantising {name}", file=sys.stderr, flush=True)
        model, seconds = quantised_copy(base, config, tok, {"n_samples": samples})
        row = evaluate(model, reference=reference, speed=False)
        rows.append({"name": name, "bits_per_weight": row["bits_per_weight"], "perplexity": row["perplexity"],
                     "kl": row["kl"], "quantize_s": seconds})
        print(f"  {name}: {row['bits_per_weight']:.4f} bpw, perplexity {row['perplexity']:.4f}", file=sys.stderr)
        del model
        gc.collect()
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("uniform", "o-"), ("mix", "s-")):
        pts = sorted((r["bits_per_weight"], r["perplexity"]) for r in rows if r["kind"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"{kind} (GPTQ)")
    ax.axhline(rows[0]["reference_perplexity"], color="grey", ls=":", label="fp32")
    ax.set_xlabel("bits per weight (quantised Linears, scales included)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title("bundled model: budgeted mixes vs uniform schemes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uniform", default=UNIFORM)
    p.add_argument("--candidates", default=CANDIDATES)
    p.add_argument("--budgets", default="3.25,3.5,4.0,4.5")
    p.add_argument("--samples", type=int, default=64, help="GPTQ calibration windows (default 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/mixed_precision")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lowbit import api
    from lowbit.eval.evaluate import eval_windows
    from lowbit.eval.fidelity import build_reference
    from lowbit.methods import parse_method
    from lowbit.pipeline.budget import budget_recipe, plan_budget
    from lowbit.pipeline.sensitivity import rank_correlation
    from lowbit.table import format_table

    base, tok = api.load_model(None)
    reference = build_reference(base, eval_windows(base, tok))
    start = time.perf_counter()
    plan, layers = budget_recipe(base, tok, f"{args.budgets.split(',')[0]}bpw", args.candidates)
    sens_s = time.perf_counter() - start
    rho = rank_correlation([k for layer in layers for k in layer.kl], [p for layer in layers for p in layer.proxy])
    mixes = {f"mix {b} bpw": plan_budget(layers, args.candidates, f"{b}bpw", base).recipe for b in args.budgets.split(",")}
    uniform = {n: parse_method(n) for n in args.uniform.split(",")}
    rows = [dict(r, kind="uniform") for r in evaluate_rows(base, tok, uniform, args.samples, reference)]
    rows += [dict(r, kind="mix") for r in evaluate_rows(base, tok, mixes, args.samples, reference)]
    for r in rows:
        r["reference_perplexity"] = reference.perplexity.perplexity
        if r["kind"] == "mix":
            rivals = [u for u in rows if u["kind"] == "uniform" and u["bits_per_weight"] >= r["bits_per_weight"] - 1e-9]
            r["beats"] = all(r["perplexity"] < u["perplexity"] for u in rivals)
    table = format_table(["row", "bits/weight", "perplexity", "KL", "beats every uniform of >= size"],
                         [[r["name"], r["bits_per_weight"], r["perplexity"], r["kl"], str(r.get("beats", ""))]
                          for r in sorted(rows, key=lambda r: r["bits_per_weight"])], markdown=True)
    notes = (f"fp32 reference perplexity {reference.perplexity.perplexity:.4f}; sensitivity: {len(layers)} Linears x "
             f"{len(args.candidates.split(','))} candidates in {sens_s:.0f} s; rank correlation (Spearman) of the "
             f"Hessian proxy with measured KL: {rho:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_precision.md").write_text(table + "\n\n" + notes + "\n")
    plotted = plot(rows, out / "mixed_precision.png")
    print(table + "\n\n" + notes + (f"\nwrote {out / 'mixed_precision.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
