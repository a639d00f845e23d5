"""How much any budgeted mix can gain over uniform schemes: the knapsack's predicted loss when bits are
allocated per Linear, and (estimated) per output row, per 8-column block, and per row and block.

    .venv/bin/python benchmarks/mix_headroom.py --model minilm     # all-MiniLM-L6-v2 (~3 min)
    .venv/bin/python benchmarks/mix_headroom.py                    # the bundled model

The predicted loss is what lowbit's allocator minimises (pipeline/budget.py): the sum over Linears of the
loss measured when that Linear alone is quantised with the chosen candidate (pipeline/sensitivity.py; read
from benchmarks/mixed_precision.py's saved sensitivity_<model>.json). A uniform scheme's prediction is the
same sum with one candidate everywhere, so the two compare like for like.

Finer grains let a Linear put a fraction f (1/8 ... 7/8) of its weights on the better candidate of a pair
(PAIRS) and the rest on the other, the most important weights on the better one. If the loss is a sum of
independent contributions, importance times error, that costs f bytes_hi + (1 - f) bytes_lo and loses
s L_hi + (1 - s) L_lo, s the share of the importance the top fraction holds:

- rows: an output row's importance is the Fisher information of the model's output summed over the row's
  weights, from gradient probes (sampled next tokens for a causal LM; random directions orthogonal to the
  unit embedding for an encoder, the Hessian of its 1 - cosine);
- column blocks: after BlockLDLQ (methods/ldlq.py) a Linear's proxy loss is sum_k tr(D_k) MSE_k over its
  8-column blocks (H = L D L^T of QuIP#'s rotated H), so a block's importance is tr(D_k);
- rows x blocks: the product of the two, importance separable over a row and a block.

Multi-level estimates let every unit (a Linear, row, block, or row and block) take its own candidate of
LADDER (QuIP# at 2, 3, 4 bits, int8), the budget met by Lagrangian relaxation; the same with two
hypothetical QuIP# codebooks of 5 and 6 bits (`extrapolated`: each bit past 4 buys what the fourth did);
and "ideal rates", every unit at any real rate on QuIP#'s 3-to-4-bit slope (transform coding's optimum, an
optimistic limit for codebooks of that efficiency).

`--check` tests the split estimate: on the Linears with the most loss at quip-4bit it quantises half the
rows, or half the blocks, at 4 bits and the rest at 3 (QuIP#, each block rounded with its own codebook
inside one BlockLDLQ pass) and measures the single-Linear loss, beside the same split made at random.

Predictions are compared with the best uniform candidate of b to b + 1 bits per weight at budget b (a
scheme of many more bits, int8, is always better) among those the sensitivity pass measures with their
own method: GPTQ's candidates are predicted from round-to-nearest on their grid, far above what GPTQ
measures, so they are left out of that comparison. Writes mix_headroom_<model>.md and .json into --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SAVED = HERE / "results" / "mixed_precision"
# (lower, higher) candidate pairs a Linear's weights may be split between, and the fractions on the higher
PAIRS = [("quip", "quip-3bit"), ("quip-3bit", "quip-4bit"), ("quip-4bit", "gptq-int8")]
FRACTIONS = tuple(k / 8 for k in range(1, 8))
BLOCK = 8                 # QuIP#'s E8 column block
CHECK_PAIR = ("quip-3bit", "quip-4bit")


def row_fisher(model, ids: torch.Tensor, names: list[str], probes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per Linear in `names`, the Fisher diagonal summed over each output row's weights [out] (float64):
    E[(d log p(y) / dW)^2] with y drawn from the model's own next-token distribution (causal LM), or
    E[(d v.e / dW)^2] with v ~ N(0, I - e e^T) for an encoder's unit mean-pooled embedding e. ids [n, L];
    `probes` draws per window, one window per backward pass."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    grads = {n: w.grad for n, w in weights.items()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(p in set(weights.values()))
    fisher = {n: torch.zeros(w.shape[0], dtype=torch.float64) for n, w in weights.items()}
    try:
        for i in range(ids.shape[0]):
            for _ in range(probes):
                for w in weights.values():
                    w.grad = None
                _probe(model, ids[i:i + 1], gen).backward()
                for n, w in weights.items():
                    if w.grad is not None:          # None: the output does not use this Linear
                        fisher[n] += w.grad.double().pow(2).sum(1)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        for n, w in weights.items():
            w.grad = grads[n]
    return fisher


def _probe(model, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A scalar whose squared gradient estimates the Fisher: log p of sampled tokens, or v.e."""
    out = model(input_ids=ids)
    logits = getattr(out, "logits", None)
    if logits is not None:
        logp = torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])
        y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
        return logp.gather(1, y).sum()
    e = torch.nn.functional.normalize(out.last_hidden_state.mean(1), dim=-1)
    v = torch.randn(e.shape, generator=gen, dtype=e.dtype)
    v = v - (v * e.detach()).sum(-1, keepdim=True) * e.detach()
    return (v * e).sum()


def top_share(importance: torch.Tensor, fraction: float) -> float:
    """The share of the total importance (any shape) held by its top `fraction` of entries."""
    v = torch.sort(importance.flatten(), descending=True).values
    return float(v[:round(fraction * len(v))].sum() / v.sum()) if float(v.sum()) > 0 else fraction


def split_options(layer, candidates: list[str], importance: torch.Tensor) -> list[tuple[int, float]]:
    """(bytes, predicted loss) of every split of PAIRS at FRACTIONS for one LayerSensitivity, the top
    fraction of `importance` (per row, block, or row and block) on the better candidate."""
    at = {c: i for i, c in enumerate(candidates)}
    out = []
    for lo, hi in PAIRS:
        if lo in at and hi in at:
            for f in FRACTIONS:
                s = top_share(importance, f)
                out.append((round(f * layer.bytes[at[hi]] + (1 - f) * layer.bytes[at[lo]]),
                            s * layer.kl[at[hi]] + (1 - s) * layer.kl[at[lo]]))
    return out


def block_weights(h: torch.Tensor, damp: float = 0.01, seed: int = 0) -> torch.Tensor:
    """tr(D_k) per 8-column block [in / 8] of the block LDL of QuIP#'s rotated, damped H [in, in]: the weight
    of block k's rounding error in BlockLDLQ's proxy loss (methods/quip.py error_weights)."""
    from lowbit.methods.quip import QuIP, error_weights

    return error_weights(h, QuIP(damp=damp, seed=seed))


def block_split_weight(weight: torch.Tensor, h: torch.Tensor, better: torch.Tensor, bits=(3, 4),
                       damp: float = 0.01, seed: int = 0) -> torch.Tensor:
    """QuIP# (methods/quip.py) with the 8-column blocks where `better` [in / 8] is True rounded at bits[1]
    and the others at bits[0] (= bits[1] - 1), in one BlockLDLQ pass, the scale tuned for the codebook at
    least half the blocks use; returns the dequantised weight [out, in] (float64)."""
    from lowbit.methods.quip import QuIP, quip_quantize

    if bits[1] != bits[0] + 1:
        raise ValueError(f"a block split rounds its better blocks one bit finer, not {bits}")
    return quip_quantize(weight, h, QuIP(bits=bits[0], damp=damp, seed=seed), finer=better).dequantize().double()


def hessians(model, ids: torch.Tensor, names: list[str], batch: int = 8) -> dict[str, torch.Tensor]:
    """X^T X of each named Linear's inputs over the windows (float64 [in, in]), all Linears in one pass."""
    from lowbit.methods.stats import LayerStats

    modules = dict(model.named_modules())
    stats = {n: LayerStats(modules[n].in_features) for n in names}

    def hook(name):
        def add(mod, inp, out):
            stats[name].update(inp[0])
        return add

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for b in range(0, ids.shape[0], batch):
                model(input_ids=ids[b:b + batch])
    finally:
        for handle in handles:
            handle.remove()
    return {n: s.xtx for n, s in stats.items()}


def measured_splits(model, ids: torch.Tensor, layers, candidates: list[str], fisher: dict, blocks: dict,
                    hess: dict, count: int, seed: int = 0) -> list[list]:
    """The split estimate checked on the `count` Linears with the largest loss at CHECK_PAIR[1]: half the
    rows (each half quantised by its own candidate) or half the column blocks (block_split_weight) on the
    better candidate, chosen by importance and, as a control, at random; the single-Linear loss measured
    as pipeline/sensitivity.py measures it. Rows: [name, then (predicted, measured) for rows by importance,
    rows at random, blocks by importance, blocks at random]."""
    from lowbit.methods import parse_method
    from lowbit.methods.stats import LayerStats
    from lowbit.pipeline.sensitivity import _logprobs, _loss

    lo, hi = (candidates.index(c) for c in CHECK_PAIR)
    configs = [parse_method(c) for c in CHECK_PAIR]
    bits = tuple(c.bits for c in configs)
    modules = dict(model.named_modules())
    model.eval()
    ref = _logprobs(model, ids, 8)
    causal = ref.shape[1] > 1
    gen = torch.Generator().manual_seed(seed)

    def measure(module, weight):
        original = module.weight.data
        module.weight.data = weight.to(original.dtype)
        try:
            return _loss(ref, _logprobs(model, ids, 8), causal)
        finally:
            module.weight.data = original

    out = []
    for layer in sorted(layers, key=lambda item: -item.kl[hi])[:count]:
        module, row = modules[layer.name], [layer.name]
        w = module.weight.data.float()
        stats = LayerStats(w.shape[1], n_tokens=1, xtx=hess[layer.name])   # methods read only H = 2 xtx / n
        for imp, split in ((fisher[layer.name], "rows"), (blocks[layer.name], "blocks")):
            for order in (torch.argsort(imp, descending=True), torch.randperm(len(imp), generator=gen)):
                top = order[:len(order) // 2]
                share = float(imp[top].sum() / imp.sum())
                row.append(share * layer.kl[hi] + (1 - share) * layer.kl[lo])
                if split == "rows":
                    q = w.clone()
                    for rows, config in ((order[len(order) // 2:], configs[0]), (top, configs[1])):
                        q[rows] = config.quantize_weight(w[rows], stats).dequantize()
                else:
                    better = torch.zeros(len(imp), dtype=torch.bool)
                    better[top] = True
                    q = block_split_weight(w, hess[layer.name], better, bits)
                row.append(measure(module, q))
        out.append(row)
    return out


def measured_by_itself(name: str) -> bool:
    """Whether the sensitivity pass measures this candidate with its own method (QuIP#, int8 RTN ...) rather
    than by round-to-nearest standing in for it (GPTQ's grids), so that its prediction is its own."""
    from lowbit.methods import parse_method
    from lowbit.pipeline.sensitivity import measure_rounding

    config = parse_method(name)
    return measure_rounding(config) is config


def predicted(options: list[list[tuple[int, float]]], budget: int) -> tuple[float, int]:
    """(least predicted loss, bytes) of one option per Linear within `budget` bytes (the exact knapsack)."""
    from lowbit.methods.knapsack import allocate

    a = allocate([[s for s, _ in o] for o in options], [[k for _, k in o] for o in options], budget)
    return a.loss, a.size


# what one unit (a Linear, row, block or code) may take in the multi-level estimates, where measured
LADDER = ("quip", "quip-3bit", "quip-4bit", "quip-5bit*", "quip-6bit*", "gptq-int8")
IDEAL_PAIR = ("quip-3bit", "quip-4bit")   # the loss-per-bit slope of the ideal-rate estimate


def unit_shares(importance: torch.Tensor) -> torch.Tensor:
    """Each unit's share of its Linear's importance, flattened (equal shares when there is none)."""
    v = importance.flatten().double()
    return v / v.sum() if float(v.sum()) > 0 else torch.full_like(v, 1 / len(v))


def _bisect(spend, budget: float, lo: float = 1e-12, hi: float = 1e12, steps: int = 200) -> float:
    """The least multiplier lam (geometric bisection) with spend(lam) <= budget; spend falls as lam grows."""
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if spend(mid) > budget else (lo, mid)
    return hi


def ladder_loss(layers, candidates: list[str], shares: dict, bits_per_weight: float) -> float:
    """Least predicted loss when every unit of every Linear takes its own candidate of LADDER, at
    `bits_per_weight` on average: unit u of a Linear costs share_u L_c and numel/U x bits_c, solved by
    Lagrangian relaxation (the lower convex hull of the exact choice; within one unit's size of it)."""
    at = [candidates.index(c) for c in LADDER if c in candidates]
    units = []
    for layer in layers:
        loss = torch.tensor([layer.kl[j] for j in at], dtype=torch.float64)
        size = torch.tensor([8 * layer.bytes[j] for j in at], dtype=torch.float64)      # bits, whole Linear
        sh = shares[layer.name]
        units.append((sh[:, None] * loss[None, :], size[None, :] / len(sh)))
    budget = bits_per_weight * sum(layer.numel for layer in layers)

    def pick(lam):
        return [torch.argmin(loss + lam * size, dim=1) for loss, size in units]

    def spend(lam):
        return sum(float(size[0, c].sum()) for (_, size), c in zip(units, pick(lam)))

    choice = pick(_bisect(spend, budget))
    return sum(float(loss.gather(1, c[:, None]).sum()) for (loss, _), c in zip(units, choice))


def extrapolated(layers, candidates: list[str]) -> tuple[list, list[str]]:
    """The sensitivities with two hypothetical candidates, quip-5bit* and quip-6bit*: each bit past quip-4bit
    divides the loss by L_3 / L_4 and adds what quip-4bit adds over quip-3bit in bytes (QuIP# has no
    codebook above 4 bits; this asks what one would buy)."""
    from lowbit.pipeline.sensitivity import LayerSensitivity

    lo, hi = (candidates.index(c) for c in IDEAL_PAIR)
    out = []
    for layer in layers:
        ratio = layer.kl[lo] / layer.kl[hi] if layer.kl[hi] > 0 else 1.0
        step = layer.bytes[hi] - layer.bytes[lo]
        out.append(LayerSensitivity(layer.name, layer.numel,
                                    layer.bytes + [layer.bytes[hi] + step, layer.bytes[hi] + 2 * step],
                                    layer.kl + [layer.kl[hi] / ratio, layer.kl[hi] / ratio ** 2],
                                    layer.proxy + [0.0, 0.0]))
    return out, candidates + ["quip-5bit*", "quip-6bit*"]


def ideal_loss(layers, candidates: list[str], shares: dict, bits_per_weight: float) -> float:
    """Least predicted loss with every unit at any real rate b, its loss share_u L_4 2^(-a (b - 4)), a
    fitted per Linear from IDEAL_PAIR (L_3 / L_4 = 2^a): transform coding's optimum, as if codebooks
    existed at every rate with QuIP#'s 3-to-4-bit slope (rates unbounded: optimistic)."""
    lo, hi = (candidates.index(c) for c in IDEAL_PAIR)
    terms = []
    for layer in layers:
        if layer.kl[hi] <= 0:
            continue
        a = max(math.log2(layer.kl[lo] / layer.kl[hi]), 1e-6)
        sh = shares[layer.name]
        keep = sh > 0
        terms.append((a, layer.kl[hi] * sh[keep], layer.numel / len(sh)))
    budget = bits_per_weight * sum(layer.numel for layer in layers)

    def rates(lam):          # d/db of w 2^(-a (b - 4)) = -lam n  ->  b = 4 + log2(a ln2 w / (lam n)) / a
        return [4 + torch.log2(a * math.log(2) * w / (lam * n)) / a for a, w, n in terms]

    def spend(lam):
        return sum(float(r.clamp_min(0).sum()) * n for r, (_, _, n) in zip(rates(lam), terms))

    lam = _bisect(spend, budget)
    return sum(float((w * torch.exp2(-a * (r.clamp_min(0) - 4))).sum()) for r, (a, w, _) in zip(rates(lam), terms))


def inside_each(estimate, layers, candidates: list[str], shares: dict, scheme: str) -> float:
    """`estimate` (ladder_loss, ideal_loss) with every Linear held to its own size under `scheme`: a uniform
    scheme that moves bits only among the units inside each Linear, the rival a finer grain also builds."""
    j = candidates.index(scheme)
    return sum(estimate([layer], candidates, shares, 8 * layer.bytes[j] / layer.numel) for layer in layers)


GRAINS = ("per Linear", "+ row splits", "+ block splits", "+ row x block splits")


def grain_options(layers, candidates: list[str], fisher: dict, blocks: dict) -> list[list[list[tuple[int, float]]]]:
    """Per grain of GRAINS, per Linear, its (bytes, predicted loss) options; each grain keeps the coarser
    ones' options, so its prediction can only be lower."""
    grains = [[list(zip(layer.bytes, layer.kl)) for layer in layers]]
    for importance in (lambda n: fisher[n], lambda n: blocks[n], lambda n: torch.outer(fisher[n], blocks[n])):
        grains.append([o + split_options(layer, candidates, importance(layer.name))
                       for o, layer in zip(grains[-1], layers)])
    return grains


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["bundled", "minilm"], default="bundled")
    p.add_argument("--sensitivity", help="sensitivity JSON (default: the saved benchmarks/results one)")
    p.add_argument("--budgets", default="3.5,3.75,4.0,4.5")
    p.add_argument("--probes", type=int, default=4, help="gradient probes per window (default 4)")
    p.add_argument("--check", type=int, default=4, help="Linears on which to quantise and measure a split of "
                   "rows and of blocks against its estimate (default 4; 0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/mixed_precision")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import mixed_precision as mp

    from lowbit.pipeline.samples import calibration_batch
    from lowbit.pipeline.sensitivity import LayerSensitivity
    from lowbit.table import format_table

    path = args.sensitivity or os.path.relpath(SAVED / f"sensitivity_{args.model}.json")
    saved = json.loads(Path(path).read_text())
    layers, how, candidates = [LayerSensitivity(**r) for r in saved["layers"]], saved["measured"], saved["candidates"]
    model, tok = mp.load(args.model)
    windows, seq_len = how.get("windows", mp.WINDOWS[args.model][0]), how.get("seq_len", mp.WINDOWS[args.model][1])
    ids = calibration_batch(tok, None, n_samples=windows, seq_len=seq_len)
    names = [layer.name for layer in layers]
    start = time.perf_counter()
    fisher = row_fisher(model, ids, names, args.probes)
    hess = hessians(model, ids, names)
    blocks = {n: block_weights(h) for n, h in hess.items()}
    checked = measured_splits(model, ids, layers, candidates, fisher, blocks, hess, args.check) if args.check else []
    seconds = time.perf_counter() - start

    grains = grain_options(layers, candidates, fisher, blocks)
    numel = sum(layer.numel for layer in layers)
    uniform = {c: (8 * sum(layer.bytes[j] for layer in layers) / numel, sum(layer.kl[j] for layer in layers))
               for j, c in enumerate(candidates)}
    own = [c for c in candidates if measured_by_itself(c)]     # the others' predictions are round-to-nearest's
    shares = {"per Linear": {n: torch.ones(1, dtype=torch.float64) for n in names},
              "rows": {n: unit_shares(fisher[n]) for n in names},
              "blocks": {n: unit_shares(blocks[n]) for n in names},
              "row x block": {n: unit_shares(torch.outer(fisher[n], blocks[n])) for n in names}}
    table, levels, result = [], [], []
    for b in map(float, args.budgets.split(",")):
        losses = [predicted(o, int(b * numel / 8))[0] for o in grains]
        ladder = [ladder_loss(layers, candidates, sh, b) for sh in shares.values()]
        wider = [ladder_loss(*extrapolated(layers, candidates), sh, b) for sh in shares.values()]
        ideal = [ideal_loss(layers, candidates, sh, b) for sh in shares.values()]
        rivals = {c: uniform[c] for c in own if b - 1e-9 <= uniform[c][0] <= b + 1}
        best = min(rivals, key=lambda c: rivals[c][1]) if rivals else None
        rival = [f"{best} ({rivals[best][0]:.3f} bits)", rivals[best][1]] if best else ["-", "-"]
        table.append([f"{b:.2f}", *losses, *rival])
        levels.append([f"{b:.2f}", *ladder, *wider, *ideal, *rival])
        result.append({"budget": b, "pairs": dict(zip(GRAINS, losses)), "ladder": dict(zip(shares, ladder)),
                       "ladder with quip-5bit*, quip-6bit*": dict(zip(shares, wider)),
                       "ideal": dict(zip(shares, ideal)), "best_uniform": best,
                       "best_uniform_loss": rivals[best][1] if best else None})
    inside, inside_result = [], None
    if "quip-4bit" in uniform:       # the rival that finer grains would also improve: quip-4bit's size per Linear
        b4 = uniform["quip-4bit"][0]
        wide = extrapolated(layers, candidates)
        inside = [[f"{b4:.3f}", *(inside_each(ladder_loss, layers, candidates, sh, "quip-4bit") for sh in shares.values()),
                   *(inside_each(ladder_loss, *wide, sh, "quip-4bit") for sh in shares.values()),
                   *(inside_each(ideal_loss, layers, candidates, sh, "quip-4bit") for sh in shares.values())]]
        inside_result = ({"bits_per_weight": b4, "ladder": dict(zip(shares, inside[0][1:5])),
                       "ladder with quip-5bit*, quip-6bit*": dict(zip(shares, inside[0][5:9])),
                          "ideal": dict(zip(shares, inside[0][9:13]))})
    loss = "KL" if args.model == "bundled" else "1 - cosine"
    rival_head = ["best uniform of b to b + 1 bits", "its prediction"]
    text = format_table(["bits/weight", f"{GRAINS[0]} ({loss})", *GRAINS[1:], *rival_head], table, markdown=True)
    text += "\n\n" + format_table(
        ["bits/weight", *(f"ladder, {g}" for g in shares), *(f"+ 5, 6 bits*, {g}" for g in shares),
         *(f"ideal rates, {g}" for g in shares), *rival_head],
        levels, markdown=True)
    if inside:
        text += "\n\n" + format_table(
            ["each Linear at quip-4bit's size (bits/weight)", *(f"ladder, {g}" for g in shares), *(f"+ 5, 6 bits*, {g}" for g in shares),
             *(f"ideal rates, {g}" for g in shares)], inside, markdown=True)
    if checked:
        text += "\n\n" + format_table(
            ["Linear", "rows by importance: predicted", "measured", "random rows: predicted", "measured",
             "blocks by importance: predicted", "measured", "random blocks: predicted", "measured"],
            [[r[0], *(f"{v:.2e}" for v in r[1:])] for r in checked], markdown=True)
    notes = (f"{args.model}: predicted losses (sum of single-Linear {loss}) from {path}; row importance from "
             f"{args.probes} gradient probes per window on {windows} windows of {seq_len} tokens; checks: "
             f"{'/'.join(CHECK_PAIR)} splits, half and half; {seconds:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"mix_headroom_{args.model}.md").write_text(text + "\n\n" + notes + "\n")
    (out / f"mix_headroom_{args.model}.json").write_text(json.dumps(
        {"budgets": result, "inside_each_linear": inside_result, "uniform": uniform, "checks": checked, "notes": notes}, indent=1))
    print(text + "\n\n" + notes)


if __name__ == "__main__":
    main()
