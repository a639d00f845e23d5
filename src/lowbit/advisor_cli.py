"""`lowbit advise`: the advisor's table, `--measure` (picking from measured KL and perplexity), and the command."""
from __future__ import annotations

import json
from dataclasses import asdict

from lowbit.advisor import gb_text
from lowbit.calc import GB
from lowbit.errors import LowbitError

def render(a) -> str:
    from lowbit.table import format_table

    pick = "will not fit" if a.pick is None else f"{a.pick.label}" + (f"  (--method {a.pick.method})" if a.pick.method else "")
    lines = [f"recommendation for {a.model} with {gb_text(a.memory_bytes)} on {a.target} (quality {a.quality}): {pick}", ""]
    lines += [f"- {r}" for r in a.reasons]
    if a.command:
        lines += ["", f"  {a.command}"]
    if a.mix_command:
        lines += ["", "  spend the headroom instead (a budgeted mix; its size is an upper bound):", f"  {a.mix_command}"]
    shown = a.options + ([a.mix] if a.mix else [])
    measured = any(o.perplexity is not None for o in shown)
    rows = [[o.label, o.method or "-", o.bits_per_weight, o.quality, o.weight_bytes / GB, o.other_bytes / GB,
             o.total_bytes / GB, "yes" if o.fits else "no"]
            + ([o.perplexity or "-", "-" if o.kl is None else f"{o.kl:.4g}"] if measured else [])
            for o in shown]
    headers = ["option", "lowbit method", "bits/weight", "quality", "weights GB", "KV/extra GB", "total GB", "fits"]
    if measured:
        headers += ["perplexity", "KL"]
    lines += ["", format_table(headers, rows),
              "", "sizes: lowbit.calc.model_size (exact stored bytes of every planned weight) + the KV cache "
                  f"(lowbit.calc.kv_cache_memory) or fine-tuning state; fits = total <= budget - {gb_text(a.reserve_bytes)} "
                  "runtime reserve (vLLM: 90% of the budget)"]
    return "\n".join(lines)


def measure(a, model: str, samples: int = 16, max_eval_tokens: int = 4096):
    """Quantise and evaluate, on the user's model, the options that fit and the budgeted mix that spends
    the headroom above the most precise of them (its recipe from sensitivities measured on this model, as
    `lowbit quantize --budget` makes it), against the same reference (lowbit.eval.compare); re-pick from
    the measurements: max -> the lowest KL to the unquantised model; balanced -> the smallest whose
    perplexity is within 2% of the lowest. Returns the concluded advice."""
    from pathlib import Path

    from lowbit.advisor import conclude, explain, resolve_shape
    from lowbit.eval.compare import Planned, compare

    if not Path(model).is_dir():
        raise LowbitError("--measure needs a model folder (it quantises and evaluates the model)")
    shape = resolve_shape(model)
    fitting = [o for o in a.options if o.fits]
    if not fitting:
        return conclude(a, shape)
    a.pick = fitting[0]
    conclude(a, shape)                  # the mix over the most precise uniform option that fits
    mix, reason = a.mix, a.mix_reason
    rows = [o.method or "fp16" for o in fitting]
    if mix is not None:
        rows.append(Planned(mix.method, mix_recipe(a, model, samples)))
    measured = fitting + ([mix] if mix is not None else [])
    for o, row in zip(measured, compare(rows, model, None, max_eval_tokens=max_eval_tokens, n_samples=samples,
                                        speed=False)):
        o.perplexity, o.kl = row["perplexity"], row["kl"]
    best = min(o.perplexity for o in measured)
    if a.quality == "max":
        a.pick = min(measured, key=lambda o: o.kl)
    else:
        a.pick = min((o for o in measured if o.perplexity <= best * 1.02), key=lambda o: o.total_bytes)
    if a.pick is not mix:
        return conclude_measured(a, shape, mix, reason)
    a.options.insert(a.options.index(fitting[0]), mix)      # in precision order, where explain() looks for it
    a.mix_reason = (f"measured on this model, its perplexity is {mix.perplexity:.3f} against {fitting[0].perplexity:.3f} "
                    f"for {fitting[0].label}, the most precise uniform option that fits")
    a.mix = a.mix_command = None
    a.reasons, a.command = explain(a, shape), mix.command
    return a


def conclude_measured(a, shape, mix, reason: str):
    """conclude() for a measured uniform pick, keeping the measured mix (and why it was offered) beside it."""
    from lowbit.advisor import conclude, explain

    conclude(a, shape)
    if mix is not None:
        a.mix, a.mix_command, a.mix_reason = mix, mix.command, reason
        a.reasons = explain(a, shape)
    return a


def mix_recipe(a, model: str, samples: int):
    """The budgeted mix's recipe on the user's model: sensitivities on `samples` calibration windows, then
    the knapsack, as `lowbit quantize --budget` does."""
    from lowbit import api
    from lowbit.advisor_mix import MIX_PLANS, candidates
    from lowbit.pipeline.budget import budget_recipe

    base, tokenizer = api.load_model(model)
    if tokenizer is None:
        raise LowbitError(f"the model folder {model} has no tokenizer; --measure evaluates on text")
    plan, _ = budget_recipe(base, tokenizer, f"{a.mix.linear_bits:.2f}bpw", candidates(MIX_PLANS[a.target]),
                            n_samples=samples, progress=False)
    return plan.recipe


def _cmd_advise(args) -> str:
    from lowbit.advisor import advise

    a = advise(args.model, args.memory, args.target, args.quality, args.context, args.batch, args.kv_cache)
    if args.measure:
        a = measure(a, args.model, args.samples)
    if args.json:
        return json.dumps(asdict(a), indent=2)
    return render(a)


def register(sub) -> None:
    from lowbit.advisor import TARGETS

    p = sub.add_parser("advise", help="pick a method and scheme for a model, a memory budget and an engine")
    p.add_argument("model", help="model folder (only config.json is read) or a class: 7b, 8b, 13b, 70b, 405b")
    p.add_argument("--memory", required=True, help="memory budget, e.g. 8GB, 24GiB")
    p.add_argument("--target", default="llama.cpp", choices=list(TARGETS), help="where the model will run")
    p.add_argument("--quality", default="balanced", choices=["max", "balanced"],
                   help="max: the most precise option that fits; balanced: the target's usual choice (default)")
    p.add_argument("--context", type=int, help="tokens of KV cache to plan for (default 4096; fine-tuning 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--kv-cache", help="plan for lowbit's quantised KV cache: int8, int4, fp8 (default fp16)")
    p.add_argument("--measure", action="store_true", help="quantise and evaluate the options that fit and the "
                   "budgeted mix, pick from measured perplexity (a model folder; minutes)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows for --measure (default 16)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_advise)
