"""`lowbit advise`: the advisor's table, `--measure` (picking from measured perplexity), and the command."""
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
    measured = any(o.perplexity is not None for o in a.options)
    rows = [[o.label, o.method or "-", o.bits_per_weight, o.quality, o.weight_bytes / GB, o.other_bytes / GB,
             o.total_bytes / GB, "yes" if o.fits else "no"] + ([o.perplexity or "-"] if measured else [])
            for o in shown]
    headers = ["option", "lowbit method", "bits/weight", "quality", "weights GB", "KV/extra GB", "total GB", "fits"]
    if measured:
        headers.append("perplexity")
    lines += ["", format_table(headers, rows),
              "", "sizes: lowbit.calc.model_size (exact stored bytes of every planned weight) + the KV cache "
                  f"(lowbit.calc.kv_cache_memory) or fine-tuning state; fits = total <= budget - {gb_text(a.reserve_bytes)} "
                  "runtime reserve (vLLM: 90% of the budget)"]
    return "\n".join(lines)


def measure(a, model: str, samples: int = 16, max_eval_tokens: int = 4096):
    """Quantise and evaluate the options that fit on the user's model; re-pick from measured perplexity:
    max -> the lowest; balanced -> the smallest within 2% of the lowest."""
    from pathlib import Path

    from lowbit.eval.compare import compare

    if not Path(model).is_dir():
        raise LowbitError("--measure needs a model folder (it quantises and evaluates the model)")
    fitting = [o for o in a.options if o.fits]
    if not fitting:
        return a
    names = [o.method or "fp16" for o in fitting]
    rows = compare(names, model, None, max_eval_tokens=max_eval_tokens, n_samples=samples, speed=False)
    for o, row in zip(fitting, rows):
        o.perplexity = row["perplexity"]
    best = min(o.perplexity for o in fitting)
    if a.quality == "max":
        a.pick = min(fitting, key=lambda o: o.perplexity)
    else:
        a.pick = min((o for o in fitting if o.perplexity <= best * 1.02), key=lambda o: o.total_bytes)
    return a


def _cmd_advise(args) -> str:
    from lowbit.advisor import advise, conclude, resolve_shape

    a = advise(args.model, args.memory, args.target, args.quality, args.context, args.batch, args.kv_cache)
    if args.measure:
        a = conclude(measure(a, args.model, args.samples), resolve_shape(args.model))
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
    p.add_argument("--measure", action="store_true", help="quantise and evaluate the options that fit, pick from "
                                                            "measured perplexity (a model folder; minutes)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows for --measure (default 16)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_advise)
