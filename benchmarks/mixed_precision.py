"""Mixed precision under a budget against uniform schemes: the Pareto table and plot.

    .venv/bin/python benchmarks/mixed_precision.py                    # the bundled model (~40 min, 2 threads)
    .venv/bin/python benchmarks/mixed_precision.py --model minilm     # all-MiniLM-L6-v2 (real weights)
    .venv/bin/python benchmarks/mixed_precision.py --budgets 3.5,4.5 --uniform gptq-int3-g32,gptq-int4-g32

On all-MiniLM-L6-v2 the score is benchmarks/real_weights.py's (mean cosine of sentence embeddings against
fp32 on 300 held-out sentences, GPTQ calibrated on 256 sentences) and sensitivity is 1 - cosine, on
sentence-sized windows (WINDOWS).

Every row is quantised (GPTQ and QuIP# at lowbit's default settings) on the same calibration windows and
scored on the same held-out windows against the same full-precision reference (lowbit.eval.compare's
protocol). Mixed rows: sensitivities measured once for every candidate of every set (pipeline/sensitivity.py:
the loss of quantising one Linear alone with each candidate, 4096 calibration tokens), then one scheme per
Linear chosen by the exact knapsack for each candidate set and budget (bits per weight over the quantised
Linears). "beats" says whether the mix scores better (perplexity lower, cosine higher) than every uniform
row of equal or larger size. Writes mixed_precision_<model>.md, .png and the sensitivities (.json) into --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

UNIFORM = ("gptq-int2-g64,gptq-int3-g128,gptq-int3-g64,gptq-int3-g32,gptq-int4-g128,gptq-int4-g64,gptq-int4-g32,"
           "quip-3bit,quip-4bit")
GPTQ = "gptq-int2-g64,gptq-int3-g128,gptq-int3-g32,gptq-int4-g128,gptq-int4-g32,gptq-int8"
# Candidate sets, each mixed at every budget: "gptq" is what `lowbit quantize --method gptq --budget` takes
# by default; "gptq+quip#" adds QuIP#'s lattice codes at 2, 3 and 4 bits.
SETS = f"gptq={GPTQ};gptq+quip#={GPTQ},quip,quip-3bit,quip-4bit"


def candidate_sets(text: str) -> dict[str, list[str]]:
    """"name=a,b;name=c,d" -> {name: [a, b], ...}."""
    sets = {}
    for part in text.split(";"):
        name, _, names = part.partition("=")
        sets[name.strip()] = [n.strip() for n in names.split(",") if n.strip()]
    return sets


def subset(layers, names: list[str], chosen: list[str]):
    """The sensitivities of `chosen` candidates only (measured once for all of `names`)."""
    from lowbit.pipeline.sensitivity import LayerSensitivity

    idx = [names.index(c) for c in chosen]
    return [LayerSensitivity(layer.name, layer.numel, [layer.bytes[i] for i in idx], [layer.kl[i] for i in idx],
                             [layer.proxy[i] for i in idx]) for layer in layers]


def bundled_rows(configs: dict, samples: int) -> tuple[list[dict], float]:
    """compare's protocol for each config (a method or a Recipe): bits/weight and held-out perplexity."""
    from lowbit import api
    from lowbit.eval.compare import quantised_copy
    from lowbit.eval.evaluate import eval_windows, evaluate
    from lowbit.eval.fidelity import build_reference

    base, tok = api.load_model(None)
    reference = build_reference(base, eval_windows(base, tok))
    rows = []
    for name, config in configs.items():
        print(f"quantising {name}", file=sys.stderr, flush=True)
        model, seconds = quantised_copy(base, config, tok, {"n_samples": samples})
        row = evaluate(model, reference=reference, speed=False)
        rows.append({"name": name, "bits_per_weight": row["bits_per_weight"], "score": row["perplexity"],
                     "kl": row["kl"], "quantize_s": seconds})
        del model
        gc.collect()
    return rows, reference.perplexity.perplexity


def minilm_rows(configs: dict) -> list[dict]:
    """real_weights.py's protocol for each config (a method or a Recipe): bits/weight and mean cosine."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import real_weights as rw

    import lowbit
    from lowbit.eval.embeddings import embed

    base, tok = lowbit.load_model(rw.model_folder())
    calibration, held_out = rw.sentences(256, 300)
    reference = embed(base, tok, held_out, max_length=rw.MAX_LENGTH)
    rows = []
    for name, config in configs.items():
        print(f"quantising {name}", file=sys.stderr, flush=True)
        r = rw.run_lowbit(config, base, tok, calibration, held_out, reference, "samples")
        rows.append({"name": name, "bits_per_weight": r["bits_per_weight"], "score": r["mean_cosine"],
                     "quantize_s": r["seconds"]})
    return rows


def plot(rows: list[dict], path: Path, ylabel: str, baseline: float, title: str) -> bool:
    """The score against bits per weight, one line per kind of row; beside it KL to fp32 (log scale) when
    the rows have it: held-out perplexity on 16K tokens does not separate the 4-bit rows, KL does."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("score", ylabel)] + ([("kl", "KL to fp32 (nats per token, log scale)")] if "kl" in rows[0] else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: (k != "uniform GPTQ", k))
    for ax, (key, label) in zip(axes[0], panels):
        for kind in kinds:
            pts = sorted((r["bits_per_weight"], r[key]) for r in rows if r["kind"] == kind)
            marker = "o-" if kind == "uniform GPTQ" else "^" if kind.startswith("uniform") else "s-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=kind)
        if key == "score":
            ax.axhline(baseline, color="grey", ls=":", label="fp32")
        else:
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (quantised Linears, scales included)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# Sensitivity windows (count, tokens), 4096 tokens each: the bundled model's calibration shape; for
# all-MiniLM-L6-v2 sentence-sized windows, as the score embeds sentences (held-out: 24.5 tokens on average).
WINDOWS = {"bundled": (16, 256), "minilm": (128, 32)}


def load(model_name: str):
    """(model, tokenizer): all-MiniLM-L6-v2 or the bundled model."""
    import lowbit

    if model_name == "minilm":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import real_weights as rw

        return lowbit.load_model(rw.model_folder())
    return lowbit.load_model(None)


def sensitivity_of(model_name: str, candidates: str, windows: int | None = None, seq_len: int | None = None):
    """(the model, its sensitivities on `windows` calibration windows of `seq_len` tokens (default
    WINDOWS), how they were measured: {"model", "windows", "seq_len", "seconds"})."""
    from lowbit.pipeline.samples import calibration_batch
    from lowbit.pipeline.sensitivity import sensitivity

    model, tok = load(model_name)
    windows, seq_len = windows or WINDOWS[model_name][0], seq_len or WINDOWS[model_name][1]
    ids = calibration_batch(tok, None, n_samples=windows, seq_len=seq_len)
    start = time.perf_counter()
    layers = sensitivity(model, candidates, ids)
    how = {"model": model_name, "windows": windows, "seq_len": seq_len, "seconds": time.perf_counter() - start}
    return model, layers, how


def saved_sensitivity(model_name: str, path: str, names: list[str]):
    """(the model, the sensitivities `path` holds, how they were measured, their candidate names) from an
    earlier run's JSON."""
    from lowbit.pipeline.sensitivity import LayerSensitivity

    saved = json.loads(Path(path).read_text())
    how = saved.get("measured", {})
    if how.get("model", model_name) != model_name:
        sys.exit(f"{path} holds sensitivities of the {how['model']} model, not {model_name}")
    missing = [n for n in names if n not in saved["candidates"]]
    if missing:
        sys.exit(f"{path} has no sensitivity for {', '.join(missing)}")
    model, _ = load(model_name)
    return model, [LayerSensitivity(**layer) for layer in saved["layers"]], {**how, "from": path}, saved["candidates"]


def add_candidates(model_name: str, layers, names: list[str], how: dict, extra: list[str]):
    """(layers, names, how) with the sensitivities of `extra` candidates measured on the saved run's windows
    and appended; the saved run's last candidate is measured again beside them and must match, so that
    the two runs' numbers are comparable (same windows, same code)."""
    anchor = names[-1]
    _, more, measured = sensitivity_of(model_name, ",".join([anchor, *extra]), how.get("windows"), how.get("seq_len"))
    for old, new in zip(layers, more):
        if old.name != new.name or abs(old.kl[-1] - new.kl[0]) > 1e-6 * max(1.0, abs(old.kl[-1])):
            sys.exit(f"{old.name}: {anchor} measures {new.kl[0]:.6g} now against {old.kl[-1]:.6g} saved: the saved "
                     f"sensitivities come from other windows or code; measure every candidate again")
        old.bytes, old.kl, old.proxy = old.bytes + new.bytes[1:], old.kl + new.kl[1:], old.proxy + new.proxy[1:]
    return layers, names + extra, {**how, "seconds_extra": measured["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["bundled", "minilm"], default="bundled")
    p.add_argument("--uniform", default=UNIFORM)
    p.add_argument("--sets", default=SETS, help='candidate sets, "name=a,b,...;name=...", each mixed at every '
                   'budget (sensitivity is measured once for all their candidates)')
    p.add_argument("--budgets", default="3.25,3.5,4.0,4.5")
    p.add_argument("--samples", type=int, default=64, help="GPTQ calibration windows, bundled model (default 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sensitivity", help="a sensitivity_<model>.json an earlier run saved: allocate from it, "
                   "measure nothing (it must hold every candidate of --sets; --sensitivity-windows/-len are "
                   "then not used)")
    p.add_argument("--add-candidates", help="with --sensitivity: measure these candidates (comma-separated) on "
                   "the saved run's windows and add them to its sensitivities (written with the rest into --out)")
    p.add_argument("--sensitivity-windows", type=int, help="calibration windows for sensitivity (default: "
                   "16 of 256 tokens on the bundled model, 128 of 32 on MiniLM)")
    p.add_argument("--sensitivity-len", type=int, help="their tokens")
    p.add_argument("--out", default="out/mixed_precision")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lowbit.methods import parse_method
    from lowbit.pipeline.budget import plan_budget
    from lowbit.pipeline.sensitivity import rank_correlation
    from lowbit.table import format_table

    sets = candidate_sets(args.sets)
    names = list(dict.fromkeys(n for chosen in sets.values() for n in chosen))
    extra = [n.strip() for n in (args.add_candidates or "").split(",") if n.strip()]
    if extra and not args.sensitivity:
        sys.exit("--add-candidates adds to the sensitivities of --sensitivity")
    if args.sensitivity:
        model, layers, how, saved = saved_sensitivity(args.model, args.sensitivity, [n for n in names if n not in extra])
        names, extra = saved, [n for n in extra if n not in saved]
        if extra:
            layers, names, how = add_candidates(args.model, layers, names, how, extra)
    else:
        model, layers, how = sensitivity_of(args.model, ",".join(names), args.sensitivity_windows,
                                               args.sensitivity_len)
    rho = rank_correlation([k for layer in layers for k in layer.kl], [p for layer in layers for p in layer.proxy])
    configs = {n: parse_method(n) for n in args.uniform.split(",")}
    for set_name, chosen in sets.items():
        for b in args.budgets.split(","):
            plan = plan_budget(subset(layers, names, chosen), chosen, f"{b}bpw", model)
            configs[f"mix {b} bpw ({set_name})"] = plan.recipe
            print(f"mix {b} bpw ({set_name}): predicted loss {plan.allocation.loss:.5g}; " + ", ".join(
                f"{c} x{sum(r[1] == c for r in plan.rows)}" for c in chosen if any(r[1] == c for r in plan.rows)),
                file=sys.stderr)
    del model
    if args.model == "minilm":
        rows, baseline, better, label = minilm_rows(configs), 1.0, max, "mean cosine to fp32"
    else:
        (rows, baseline), better, label = bundled_rows(configs, args.samples), min, "held-out perplexity"
    for r in rows:
        r["kind"] = (f"mix ({r['name'].split('(')[-1].rstrip(')')})" if r["name"].startswith("mix") else
                     "uniform GPTQ" if r["name"].startswith("gptq") else "uniform " + r["name"].split("-")[0])
    for r in rows:
        if r["kind"].startswith("mix"):
            rivals = [u["score"] for u in rows if u["kind"].startswith("uniform")
                      and u["bits_per_weight"] >= r["bits_per_weight"] - 1e-9]
            r["beats"] = all(better(r["score"], u) == r["score"] and r["score"] != u for u in rivals)
    kl = "kl" in rows[0]          # the bundled model: KL to fp32 too, finer than perplexity at these levels
    table = format_table(["row", "bits/weight", label] + (["KL"] if kl else []) + ["beats every uniform of >= size"],
                         [[r["name"], r["bits_per_weight"], r["score"]] + ([r["kl"]] if kl else [])
                          + [str(r.get("beats", ""))] for r in sorted(rows, key=lambda r: r["bits_per_weight"])],
                         markdown=True)
    measured = (f"on {how['windows']} windows of {how['seq_len']} tokens" if "windows" in how else "") + (
        f" (loaded from {how['from']})" if "from" in how else f" in {how['seconds']:.0f} s")
    notes = (f"{args.model}: fp32 {label} {baseline:.4f}; sensitivity: {len(layers)} Linears x "
             f"{len(names)} candidates {measured}; rank correlation (Spearman) of the "
             f"Hessian proxy with the measured loss: {rho:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sensitivity_{args.model}.json").write_text(json.dumps(
        {"measured": {k: v for k, v in how.items() if k != "from"}, "candidates": names,
         "layers": [vars(layer) for layer in layers]}))
    (out / f"mixed_precision_{args.model}.md").write_text(table + "\n\n" + notes + "\n")
    (out / f"mixed_precision_{args.model}.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=1))
    plotted = plot(rows, out / f"mixed_precision_{args.model}.png", label, baseline,
                   f"{args.model}: budgeted mixes vs uniform schemes")
    print(table + "\n\n" + notes + (f"\nwrote {out}/mixed_precision_{args.model}.png" if plotted else ""))


if __name__ == "__main__":
    main()
