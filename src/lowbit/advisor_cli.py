"""`lowbit advise`: the advisor's table, `--measure` (picking from measured KL), and the command."""
from __future__ import annotations

import json
from dataclasses import asdict

from lowbit.advisor import gb_text
from lowbit.calc import GB
from lowbit.errors import LowbitError

def render(a) -> str:
    from lowbit.table import format_table

    pick = "will not fit" if a.pick is None else f"{a.pick.label}" + (
        f"  (--method {a.pick.method})" if a.pick.method and not a.pick.command else "")
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
    `lowbit quantize --budget` makes it), against one reference (lowbit.eval.compare's protocol); re-pick
    from the measurements (pick_measured). Returns the concluded advice."""
    from pathlib import Path

    from lowbit import api
    from lowbit.advisor import conclude, headroom_mix, resolve_shape
    from lowbit.eval.compare import Planned, compare

    if not Path(model).is_dir():
        raise LowbitError("--measure needs a model folder (it quantises and evaluates the model)")
    shape = resolve_shape(model)
    fitting = [o for o in a.options if o.fits]
    if not fitting:
        return conclude(a, shape)
    a.pick = fitting[0]
    headroom_mix(a, shape, samples)     # its command calibrates as measured here
    mix = a.mix
    loaded = api.load_model(model)
    if loaded[1] is None:
        raise LowbitError(f"the model folder {model} has no tokenizer; --measure evaluates on text")
    rows = [o.method or "fp16" for o in fitting]
    if mix is not None:
        rows.append(Planned(mix.method, mix_recipe(a, loaded, samples)))
    measured = fitting + ([mix] if mix is not None else [])
    for o, row in zip(measured, compare(rows, model, None, max_eval_tokens=max_eval_tokens, n_samples=samples,
                                        speed=False, loaded=loaded)):
        o.perplexity, o.kl = row["perplexity"], row["kl"]
    a.pick = pick_measured(measured, a.quality)
    return conclude_measured(a, shape, fitting[0])


def pick_measured(measured: list, quality: str):
    """max: the lowest KL to the unquantised model; balanced: the smallest option within BALANCED_KL,
    else the lowest KL (advisor.MEASURED_RULE says it in words)."""
    from lowbit.advisor import BALANCED_KL

    close = [o for o in measured if o.kl <= BALANCED_KL]
    if quality == "max" or not close:
        return min(measured, key=lambda o: o.kl)
    return min(close, key=lambda o: o.total_bytes)


def conclude_measured(a, shape, top):
    """conclude() after measuring. The mix measured (a.mix, over `top`, the most precise uniform option
    that fits) is the pick, or stays beside a uniform pick: offered when more faithful, else shown with
    its numbers and why it is not offered."""
    from lowbit.advisor import conclude, explain

    mix, reason, mix_command = a.mix, a.mix_reason, a.mix_command
    if a.pick is mix:
        a.options.insert(a.options.index(top), mix)      # in precision order, where explain() looks for it
        a.mix = a.mix_command = None
        a.mix_reason = (f"measured on this model, its KL to the unquantised model is {mix.kl:.4g} against "
                        f"{top.kl:.4g} for {top.label}, the most precise uniform option that fits")
        a.reasons, a.command = explain(a, shape), mix.command
        return a
    conclude(a, shape)
    if mix is None:
        return a
    a.mix = mix
    if mix.kl < a.pick.kl:
        a.mix_command = mix_command
        a.mix_reason = reason if a.pick is top else (
            f"measured on this model, a mix is more faithful than {a.pick.label} (KL {mix.kl:.4g} against "
            f"{a.pick.kl:.4g}) for {gb_text(mix.total_bytes - a.pick.total_bytes)} more")
    else:
        a.mix_command = None
        a.mix_reason = (f"the mix measured on this model is no more faithful than {a.pick.label} (KL {mix.kl:.4g} "
                        f"against {a.pick.kl:.4g})")
    a.reasons = explain(a, shape)
    return a


def mix_recipe(a, loaded: tuple, samples: int):
    """The budgeted mix's recipe on the user's model, loaded = (model, tokenizer): sensitivities on
    `samples` calibration windows, then the knapsack, as `lowbit quantize --budget` does."""
    from lowbit.advisor_mix import MIX_PLANS, candidates
    from lowbit.pipeline.budget import budget_recipe

    plan, _ = budget_recipe(*loaded, f"{a.mix.linear_bits:.2f}bpw", candidates(MIX_PLANS[a.target]),
                            n_samples=samples)
    return plan.recipe


def _cmd_advise(args) -> str:
    from lowbit.advisor import advise

    a = advise(args.model, args.memory, args.target, args.quality, args.context, args.batch, args.kv_cache)
    if args.measure:
        if args.samples < 1:
            raise LowbitError(f"--samples must be at least 1, got {args.samples}")
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
                   help="max: the most precise option that fits (measured: the most faithful); balanced: the "
                        "target's usual choice (measured: the smallest within a 2%% perplexity rise) (default)")
    p.add_argument("--context", type=int, help="tokens of KV cache to plan for (default 4096; fine-tuning 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--kv-cache", help="plan for lowbit's quantised KV cache: int8, int4, fp8 (default fp16)")
    p.add_argument("--measure", action="store_true", help="quantise and evaluate the options that fit and the "
                   "budgeted mix, pick from their measured KL to the unquantised model (a model folder; minutes)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows for --measure: sensitivity and "
                   "calibration (default 16)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_advise)
