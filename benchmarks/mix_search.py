"""The best per-Linear mix a *measured* search finds, against the allocator's and the best uniform scheme.

    .venv/bin/python benchmarks/mix_search.py --model minilm --budget 3.5     # all-MiniLM-L6-v2 (~20 min)
    .venv/bin/python benchmarks/mix_search.py --model minilm --budget 3.5 --objective sentences   # (~35 min)

The allocator (pipeline/budget.py) sums single-Linear losses; a mix's held-out loss runs well above that sum
(benchmarks/mix_headroom.py: 1.5x to 1.7x on all-MiniLM-L6-v2), so a mix it rejects might still win. This
search drops the additive model: every Linear is quantised once with every candidate (each from its own
full-precision inputs, as pipeline/sensitivity.py measures), and mixes are scored by running the whole model
with those weights. From the allocator's choice it repeats: measure, in the current mix, what moving each
Linear one candidate up or down changes (the loss of the whole model); solve the knapsack on those in-context
changes (stay, up or down per Linear, within the budget); keep the result if the whole model's measured loss
falls, else try the best (up, down) pairs per byte; stop when neither helps or after --rounds. The score is the
sensitivity pass's calibration windows, or with --objective sentences (all-MiniLM-L6-v2) the calibration
sentences whole, as the held-out score embeds them.

Scores: the search's loss on the calibration windows it optimises; then, for the allocator's mix, the
searched mix and each uniform candidate of equal or larger size, the real pipeline on held-out data
(benchmarks/real_weights.py's protocol for all-MiniLM-L6-v2: mean cosine of 300 held-out sentence embeddings,
sequential quantisation; the bundled model: lowbit.eval.compare's perplexity), so the rows compare with
mixed_precision_<model>.md. Writes mix_search_<model>_<budget>.md and .json into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SAVED = HERE / "results" / "mixed_precision"
CANDIDATES = "quip,quip-2.5bit,quip-3bit,quip-3.25bit,quip-3.5bit,quip-3.75bit,quip-4bit,gptq-int8"


def quantised_weights(model, feed, plans, names) -> dict[str, list[torch.Tensor]]:
    """{Linear: [its dequantised weight under each candidate]}, each Linear from its full-precision inputs
    over what `feed()` runs through the model (the stand-in pipeline/sensitivity.py measures: QuIP# itself,
    RTN on a scheme's grid)."""
    from lowbit.methods.stats import LayerStats
    from lowbit.pipeline.sensitivity import measure_rounding

    modules = dict(model.named_modules())
    stats = {n: LayerStats(modules[n].weight.shape[1]) for n in names}
    hooks = [modules[n].register_forward_hook(
        lambda mod, inp, out, n=n: stats[n].update(inp[0].reshape(-1, inp[0].shape[-1]).float())) for n in names]
    try:
        feed()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for i, n in enumerate(names):
        w = modules[n].weight.detach().float()
        out[n] = []
        for plan in plans:
            cfg, info = plan[n]
            stand_in = measure_rounding(cfg).for_layer(info)
            out[n].append(stand_in.quantize_weight(w, stats[n] if stand_in.alone else None).dequantize().float())
        print(f"  quantised {i + 1}/{len(names)} {n}", file=sys.stderr, flush=True)
    return out


def window_objective(model, ids: torch.Tensor, batch: int = 8):
    """(feed, loss) on calibration windows ids [n, L]: pipeline/sensitivity.py's loss (KL per position, or
    1 - cosine of mean-pooled windows for an encoder)."""
    from lowbit.pipeline.sensitivity import _logprobs, _loss

    ref = _logprobs(model, ids, batch)
    with torch.inference_mode():
        causal = getattr(model(input_ids=ids[:1, :2]), "logits", None) is not None
    return (lambda: _logprobs(model, ids, batch)), (lambda: _loss(ref, _logprobs(model, ids, batch), causal))


def sentence_objective(model, tok, sentences: list[str], max_length: int):
    """(feed, loss) on whole sentences as the encoder is used and scored: each sentence alone with its special
    tokens (no padding reaches a Hessian), loss 1 - mean cosine of the sentence embeddings against the
    full-precision model's (benchmarks/real_weights.py's score)."""
    from lowbit.eval.embeddings import embed, embedding_fidelity

    encoded = [tok(s, truncation=True, max_length=max_length, return_tensors="pt") for s in sentences]

    @torch.inference_mode()
    def feed():
        for enc in encoded:
            model(**enc)

    with torch.inference_mode():
        ref = embed(model, tok, sentences, max_length=max_length)

    @torch.inference_mode()
    def loss():
        return 1 - embedding_fidelity(ref, embed(model, tok, sentences, max_length=max_length)).mean_cosine
    return feed, loss


class Scorer:
    """The whole model's loss under `loss()` with each Linear's weight set to its chosen candidate."""

    def __init__(self, model, loss, weights: dict):
        self.loss, self.weights = loss, weights
        self.modules = {n: m for n, m in model.named_modules() if n in weights}
        self.evals = 0

    def __call__(self, choice: dict[str, int]) -> float:
        for n, j in choice.items():
            self.modules[n].weight.data = self.weights[n][j].to(self.modules[n].weight.dtype)
        self.evals += 1
        return self.loss()


def search(score: Scorer, start: dict[str, int], sizes: dict[str, list[int]], limit: int, rounds: int,
           log=print) -> tuple[dict[str, int], list[dict]]:
    """Local search from `start` (candidate index per Linear; sizes[n][j] bytes, increasing in j) within
    `limit` bytes; returns (the best choice, one record per round)."""
    from lowbit.methods.knapsack import allocate

    best, best_loss = dict(start), score(start)
    history = [{"round": 0, "loss": best_loss, "evals": score.evals}]
    log(f"round 0: {best_loss:.6f}")
    for r in range(1, rounds + 1):
        moves = {}
        for n, j in best.items():
            for step in (-1, 1):
                if 0 <= j + step < len(sizes[n]):
                    moves[n, step] = score({**best, n: j + step}) - best_loss
        names = list(best)
        opts = [[(best[n] + s) for s in (-1, 0, 1) if s == 0 or (n, s) in moves] for n in names]
        alloc = allocate([[sizes[n][j] for j in o] for n, o in zip(names, opts)],
                         [[moves.get((n, j - best[n]), 0.0) for j in o] for n, o in zip(names, opts)], limit)
        tried = [{n: o[k] for n, o, k in zip(names, opts, alloc.choice)}]

        def cost(n, s):    # bytes a move of n by s adds (s = 1) or frees (s = -1)
            return max(abs(sizes[n][best[n] + s] - sizes[n][best[n]]), 1)

        # per byte: the most loss removed per byte added, the least loss added per byte freed
        ups = sorted((d / cost(n, s), d, n) for (n, s), d in moves.items() if s == 1)
        downs = sorted((d / cost(n, s), d, n) for (n, s), d in moves.items() if s == -1)
        spare = limit - sum(sizes[n][j] for n, j in best.items())
        for _, du, up in ups[:3]:
            for _, dd, down in downs[:3]:
                if up != down and sizes[up][best[up] + 1] - sizes[up][best[up]] - (
                        sizes[down][best[down]] - sizes[down][best[down] - 1]) <= spare:
                    tried.append({**best, up: best[up] + 1, down: best[down] - 1})
        improved = False
        for choice in tried:
            if choice == best:
                continue
            loss = score(choice)
            if loss < best_loss:
                best, best_loss, improved = choice, loss, True
                break
        history.append({"round": r, "loss": best_loss, "evals": score.evals})
        log(f"round {r}: {best_loss:.6f} ({score.evals} evaluations){'' if improved else ', no move helps'}")
        if not improved:
            break
    return best, history


def crossing(layers, target: float, hi: float = 8.0, steps: int = 30) -> float:
    """The least budget (bits per weight, to bisection precision, from the smallest mix up to `hi`) at which
    the knapsack's predicted loss (sum of single-Linear losses) is at most `target`."""
    from lowbit.methods.knapsack import allocate
    from lowbit.units import budget_linear_bytes

    numel = sum(layer.numel for layer in layers)
    lo = 8 * sum(min(layer.bytes) for layer in layers) / numel

    def loss(b):
        return allocate([layer.bytes for layer in layers], [layer.kl for layer in layers],
                        budget_linear_bytes(b, numel)).loss

    if loss(lo) <= target:
        return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if loss(mid) <= target else (mid, hi)
    return hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["bundled", "minilm"], default="minilm")
    p.add_argument("--budget", default="3.5", help="bits per weight over the quantised Linears")
    p.add_argument("--candidates", default=CANDIDATES)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--objective", choices=["windows", "sentences"], default="windows",
                   help="what the search scores: the sensitivity pass's calibration windows, or (minilm) the "
                        "calibration sentences whole, as the held-out score uses them")
    p.add_argument("--sensitivity", help="saved sensitivities to start from (default: the fractional run's)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=str(SAVED))
    args = p.parse_args()
    if args.objective == "sentences" and args.model != "minilm":
        p.error("--objective sentences scores sentence embeddings: --model minilm")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import mixed_precision as mp

    from lowbit.methods.recipe import DEFAULT_SKIP, Recipe
    from lowbit.pipeline.budget import plan_budget
    from lowbit.pipeline.samples import calibration_batch
    from lowbit.pipeline.sensitivity import candidate_configs, candidate_plans
    from lowbit.units import budget_linear_bytes

    start_time = time.perf_counter()
    names = [c.strip() for c in args.candidates.split(",")]
    saved = args.sensitivity or str(SAVED / f"sensitivity_{args.model}_fractional.json")
    model, layers, how, saved_names = mp.saved_sensitivity(args.model, saved, names)
    layers = mp.subset(layers, saved_names, names)
    configs = candidate_configs(names)
    plan = plan_budget(layers, configs, f"{args.budget}bpw", model)
    linears = [layer.name for layer in layers]
    sizes = {layer.name: layer.bytes for layer in layers}
    if any(s != sorted(s) for s in sizes.values()):
        sys.exit("--candidates must be in increasing size")
    limit = budget_linear_bytes(float(args.budget), sum(layer.numel for layer in layers))
    start = dict(zip(linears, plan.allocation.choice))
    _, tok = mp.load(args.model)
    if args.objective == "sentences":
        import real_weights as rw

        calibration = rw.sentences(256, 300)[0]              # the sentences the held-out rows calibrate on
        feed, loss = sentence_objective(model, tok, calibration, rw.MAX_LENGTH)
        data = f"{len(calibration)} calibration sentences"
    else:
        windows, seq_len = how.get("windows"), how.get("seq_len")
        feed, loss = window_objective(model, calibration_batch(tok, None, n_samples=windows, seq_len=seq_len))
        data = f"{windows} calibration windows of {seq_len} tokens"
    print(f"quantising {len(linears)} Linears x {len(names)} candidates", file=sys.stderr, flush=True)
    weights = quantised_weights(model, feed, candidate_plans(model, configs), linears)
    score = Scorer(model, loss, weights)
    best, history = search(score, start, sizes, limit, args.rounds,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    evals = score.evals
    uniform = [n for j, n in enumerate(names) if not n.startswith("gptq-int8") and
               sum(s[j] for s in sizes.values()) >= limit]
    searched = {n: score({m: names.index(n) for m in linears}) for n in uniform}   # same windows, same weights
    del model, weights, score.weights        # the rows below load the model afresh

    def recipe(choice):
        return Recipe(configs[0], [(n, configs[j]) for n, j in choice.items()], skip=tuple(DEFAULT_SKIP))

    bpw = {k: 8 * sum(sizes[n][j] for n, j in c.items()) / sum(layer.numel for layer in layers)
           for k, c in (("allocator", start), ("search", best))}
    rows_in = {f"mix {args.budget} bpw, allocator": recipe(start), f"mix {args.budget} bpw, measured search": recipe(best)}
    rows_in.update({n: configs[names.index(n)] for n in uniform})
    rows = mp.minilm_rows(rows_in) if args.model == "minilm" else mp.bundled_rows(rows_in, 64)[0]
    table_rows = []
    for r in rows:
        kind = "allocator" if "allocator" in r["name"] else "search" if "search" in r["name"] else None
        loss = {"allocator": history[0]["loss"], "search": history[-1]["loss"]}.get(kind, searched.get(r["name"]))
        table_rows.append([r["name"], r["bits_per_weight"], "-" if loss is None else f"{loss:.5f}", r["score"]])
    from lowbit.table import format_table

    metric = "mean cosine to fp32" if args.model == "minilm" else "perplexity"
    md = format_table(["row", "bits/weight", "search loss (calibration)", f"held-out {metric}"], table_rows,
                      markdown=True)
    moved = {n: (names[start[n]], names[best[n]]) for n in linears if start[n] != best[n]}
    predicted = {n: sum(layer.kl[names.index(n)] for layer in layers) for n in uniform}
    rival = min(predicted, key=predicted.get)
    md += (f"\n\npredicted (sum of single-Linear losses, {saved}): allocator's mix {plan.allocation.loss:.5f}; "
           + "; ".join(f"{n} {v:.5f}" for n, v in predicted.items())
           + f"; the prediction reaches {rival}'s at {crossing(layers, predicted[rival]):.2f} bits/weight")
    md += (f"\n\n{args.model}: {len(history) - 1} rounds, {evals} whole-model evaluations on {data}; "
           f"{len(moved)} Linears moved from the allocator's choice; "
           f"{time.perf_counter() - start_time:.0f} s\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # not with_suffix: "3.5" has a dot
    stem = f"mix_search_{args.model}_{args.budget}" + ("_sentences" if args.objective == "sentences" else "")
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(
        {"objective": args.objective, "predicted": {"allocator": plan.allocation.loss, **predicted}, "rows": rows, "history": history, "moved": moved, "bits_per_weight": bpw, "candidates": names,
         "allocator": {n: names[j] for n, j in start.items()}, "search": {n: names[j] for n, j in best.items()}},
        indent=1))
    print(md)


if __name__ == "__main__":
    main()
