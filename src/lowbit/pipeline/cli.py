"""`lowbit quantize`: load a model folder, quantise it block by block, save the native format."""
from __future__ import annotations

import math
from dataclasses import fields

from lowbit.errors import LowbitError


def method_from_args(args):
    """A config from --method (a name like "rtn" plus flags, or a full short name like "rtn-int4-g128")."""
    from lowbit.methods import METHODS, parse_method

    name = args.method.lower()
    given = {"bits": args.bits, "group_size": args.group_size, "observer": args.observer,
             "symmetric": False if args.asym else None}
    flags = {k: v for k, v in given.items() if v is not None}
    if name not in METHODS:
        if flags:
            raise LowbitError(f"--bits/--group-size/--asym/--observer go with a bare method name (rtn, gptq ...); "
                              f"{args.method!r} already names its scheme: write the change into it (e.g. rtn-int3-g64)")
        return parse_method(name)
    cls = METHODS[name]
    names = {f.name for f in fields(cls)} | set(getattr(cls, "shorthand", ()))
    ignored = sorted(k for k in flags if k not in names)
    if ignored:
        raise LowbitError(f"{cls.name} takes no {ignored[0].replace('_', '-')} setting")
    kwargs = {k: v for k, v in given.items() if v is not None and k in names}
    if "bits" in kwargs:
        kwargs.update(_whole_bits(cls, kwargs["bits"]))
    if args.group_size == 0 and "group_size" in names:
        kwargs["group_size"] = None  # --group-size 0: per channel
    return cls(**kwargs)


def _whole_bits(cls, bits: float) -> dict:
    """--bits as the method's fields: an integer, or a fractional rate the method names with a word (QuIP#'s
    "3.5bit": bits 3, plus 0.5); any other fraction is refused, with the way to ask for an average."""
    from lowbit.methods.names import _number

    if not (math.isfinite(bits) and 1 <= bits <= 64):
        raise LowbitError(f"--bits must be a number of bits per weight from 1 to 64, got {bits!r}")
    if abs(bits - round(bits)) < 1e-9:
        return {"bits": int(round(bits))}
    rates = {float(w[:-3]): v for w, v in getattr(cls, "words", {}).items()
             if isinstance(v, dict) and w.endswith("bit") and _number(w[:-3], 0.0) is not None}
    fractional = sorted(r for r in rates if r != int(r))
    if fractional:
        rate = next((r for r in fractional if abs(r - bits) < 1e-9), None)
        if rate is None:
            *most, last = (f"{r:g}" for r in sorted(rates))
            raise LowbitError(f"{cls.name} takes --bits {', '.join(most)} or {last}, not {bits!r}")
        return dict(rates[rate])
    raise LowbitError(f"{cls.name} takes whole bits, not {bits!r}; for {bits!r} bits per weight on average, mix "
                      f"schemes under a budget: --budget {bits!r}bpw")


def _cmd_quantize(args) -> str:
    from lowbit.io.atomic import check_output
    from lowbit.methods.recipe import DEFAULT_SKIP, Recipe
    from lowbit.pipeline.calibration import needs_calibration
    from lowbit.pipeline.distributed import launched, process_group

    out = check_output(args.output, "output folder")  # before any work: a bad path costs seconds, not a run
    check_sizes(args)
    config = method_from_args(args)
    if config.trains:
        raise LowbitError(f"{config.short_name()} is trained, not solved: run `lowbit qat MODEL --scheme "
                          f"{'-'.join(config._scheme_words()) or 'int4-g128'} -o OUT`")
    if args.budget:
        from lowbit.pipeline.budget import parse_budget

        parse_budget(args.budget)          # a typo costs a second, not a sensitivity pass
        if args.stream:
            raise LowbitError("--budget measures every layer with the whole model in memory; run it without --stream")
    recipe = Recipe(config, skip=tuple(DEFAULT_SKIP) + tuple(args.skip or ()))
    calibrate = needs_calibration(recipe) or args.calibration or args.samples or args.seq_len
    if launched():
        check_launch(args)
    if not args.ignore_memory:
        check_fits(args.model, recipe, calibrate, args)
    if args.stream:
        return _streamed(args, recipe, calibrate, out)
    if launched():
        with process_group():
            return _in_memory(args, config, recipe, calibrate, out, distributed=True)
    return _in_memory(args, config, recipe, calibrate, out)


def _in_memory(args, config, recipe, calibrate, out, distributed: bool = False) -> str:
    """Load the whole model, quantise it (its work shared among torchrun's ranks when `distributed`), and
    save it from rank 0 (the other ranks hold the same model and write nothing)."""
    from lowbit import api
    from lowbit.pipeline.calibration import needs_calibration
    from lowbit.pipeline.distributed import rank

    model, tokenizer = api.load_model(args.model, trust_remote_code=args.trust_remote_code)
    plan_text = ""
    if args.budget:
        recipe, plan_text = _budget_recipe(args, config, model, tokenizer)
        calibrate = needs_calibration(recipe) or args.calibration or args.samples or args.seq_len
    # a calibration-free method reads no text and runs no forward pass unless asked (for the report)
    api.quantize(model, recipe, calibration=args.calibration, tokenizer=tokenizer if calibrate else None,
                 n_samples=args.samples or api.DEFAULT_SAMPLES, seq_len=args.seq_len, seed=args.seed,
                 progress=not args.quiet and rank() == 0, target=args.target, calibration_mode=args.calibration_mode,
                 distributed=distributed)
    if not any(hasattr(m, "layer_config") for m in model.modules()):
        raise LowbitError("nothing was quantised (every Linear was skipped or unsupported); nothing written")
    if rank() != 0:
        return ""
    api.save(model, out, tokenizer=tokenizer)
    return plan_text + _saved(model, "mixed-precision" if args.budget else config.short_name(), out)


def check_launch(args) -> None:
    """What a run under torchrun does not take, refused in one line before any work."""
    if args.stream:
        raise LowbitError("--stream runs in one process: drop torchrun, or drop --stream to share the work in memory")
    if args.budget:
        raise LowbitError("--budget's sensitivity pass is not shared among processes: run it without torchrun")


def _budget_recipe(args, config, model, tokenizer):
    """--budget: (the recipe with one scheme per Linear, its table) from sensitivities measured on the model."""
    from lowbit.pipeline.budget import SENSITIVITY_SAMPLES, budget_recipe, default_candidates, render_plan

    if tokenizer is None:
        raise LowbitError("--budget measures sensitivity on text: the model folder needs a tokenizer")
    candidates = args.candidates or default_candidates(config.name)
    plan, _ = budget_recipe(model, tokenizer, args.budget, candidates, args.calibration, seed=args.seed,
                            n_samples=args.samples or SENSITIVITY_SAMPLES, seq_len=args.seq_len,
                            progress=not args.quiet,
                            skip=tuple(args.skip or ()))
    return plan.recipe, render_plan(plan) + "\n\n"


def _saved(model, name: str, out) -> str:
    from lowbit.pipeline.report import summarize

    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return (f"{model.lowbit_calibration}\n{summarize(model.lowbit_report)}\n\nsaved {name} model to "
            f"{out} ({weights / 1e6:,.2f} MB of weights; `lowbit eval` reports the memory it promises)")


def _streamed(args, recipe, calibrate, out) -> str:
    """--stream: one block in memory at a time, resumable (the same command continues an interrupted run)."""
    from lowbit import api

    if args.trust_remote_code or args.target:
        raise LowbitError("--stream does not take --trust-remote-code or --target yet; run without --stream")
    model = api.quantize_folder(args.model, recipe, out, calibration=args.calibration, use_tokenizer=bool(calibrate),
                                n_samples=args.samples or api.DEFAULT_SAMPLES, seq_len=args.seq_len, seed=args.seed,
                                progress=not args.quiet, calibration_mode=args.calibration_mode)
    return _saved(model, recipe.default.short_name(), out)


def check_sizes(args) -> None:
    if args.samples is not None and args.samples < 1:
        raise LowbitError(f"--samples must be at least 1, got {args.samples}")
    if args.seq_len is not None and args.seq_len < 2:
        raise LowbitError(f"--seq-len must be at least 2, got {args.seq_len}")


def _planned(model, recipe, calibrate, args, probe: bool):
    from lowbit import api
    from lowbit.pipeline.plan import plan_folder

    samples = (args.samples or api.DEFAULT_SAMPLES) if calibrate else 0
    return plan_folder(model, recipe, samples, args.seq_len, probe=probe)


def check_fits(model, recipe, calibrate, args) -> None:
    """Refuse, before any work, a run the plan says cannot fit in the memory available (a folder the
    planner cannot read, such as a pre-quantised one, is left to the loader's own checks). Under torchrun
    every process on this machine holds its own copy of the model."""
    from lowbit.pipeline.distributed import local_processes

    try:
        plan = _planned(model, recipe, calibrate, args, probe=False)
    except LowbitError:
        return
    copies = local_processes()
    need = (plan.streamed_peak_bytes if args.stream else plan.in_memory_peak_bytes) * copies
    if plan.available_bytes is None or need <= plan.available_bytes:
        return
    who = f" ({copies} processes with a copy of the model each)" if copies > 1 else ""
    hint = "" if args.stream or copies > 1 or not plan.fits(True) else (f"; --stream needs about "
                                                                         f"{plan.streamed_peak_bytes / 2 ** 30:,.2f} GiB")
    raise LowbitError(f"this run needs about {need / 2 ** 30:,.2f} GiB of memory{who}, {plan.available_bytes / 2 ** 30:,.2f} "
                      f"GiB are available{hint} (`lowbit plan` for the details; --ignore-memory to run anyway)")


def _cmd_plan(args) -> str:
    from lowbit.methods.recipe import DEFAULT_SKIP, Recipe
    from lowbit.pipeline.calibration import needs_calibration
    from lowbit.pipeline.plan import describe_plan

    check_sizes(args)
    recipe = Recipe(method_from_args(args), skip=tuple(DEFAULT_SKIP) + tuple(args.skip or ()))
    calibrate = needs_calibration(recipe) or args.samples or args.seq_len
    plan = _planned(args.model, recipe, calibrate, args, probe=not args.no_probe)
    if args.stream and not plan.streams:
        from lowbit.pipeline.runner import E2E_CANNOT_STREAM

        raise LowbitError(E2E_CANNOT_STREAM)
    if args.json:
        import json

        return json.dumps(plan.to_dict(), indent=1)
    return describe_plan(plan, recipe.default.short_name(), args.model)


def add_method_flags(p) -> None:
    from lowbit.methods import METHODS

    p.add_argument("--method", default="rtn", help=f"a method ({', '.join(sorted(METHODS))}) with --bits, --group-size "
                   "..., or a short name that states its scheme, such as rtn-int4-g128 or gptq-int4-g128 (default rtn)")
    p.add_argument("--bits", type=float, help="bits per weight (with a bare method name; quip also takes 2.25 to 3.75 "
                   "in quarter steps)")
    p.add_argument("--group-size", type=int, help="elements per scale group; 0 = per output channel")
    p.add_argument("--asym", action="store_true", help="asymmetric (integer zero point per group)")
    p.add_argument("--observer", choices=["minmax", "mse", "percentile"], help="how ranges are chosen (RTN)")
    # extend, not store: `--skip A --skip B` keeps both (a repeated flag silently dropped A before)
    p.add_argument("--skip", nargs="*", action="extend",
                   help="extra Linear name patterns to keep in full precision (repeatable)")


def add_calibration_mode(p) -> None:
    p.add_argument("--calibration-mode", choices=["auto", "windows", "samples"], default="auto",
                   help="windows: seeded windows of one stream of the documents; samples: each document its own "
                        "sequence with the tokenizer's special tokens (chat rows through its chat template), "
                        "padding masked out of every statistic; auto (default): samples for encoders and chat "
                        "rows, windows otherwise")


def add_threads(p) -> None:
    p.add_argument("--threads", type=int, help="CPU threads for tensor work (default: torch's choice; on a busy "
                   "machine fewer is often faster)")


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantise a model folder (default: the bundled model)")
    p.add_argument("model", nargs="?", default=None, help="Hugging Face model folder; omitted: the bundled model")
    add_method_flags(p)
    p.add_argument("--budget", help="mixed precision: a scheme per Linear, least measured loss within this size: "
                                     "3.5bpw (bits per weight of the quantised Linears) or 4GB (the whole model)")
    p.add_argument("--candidates", help="schemes to mix under --budget, comma-separated method names (default: the "
                                        "method at int2-g64, int3-g128, int3-g32, int4-g128, int4-g32, int8; for "
                                        "--method quip its rates quip, quip-2.5bit, quip-3bit, quip-3.25bit ... "
                                        "quip-4bit; add quip-3bit,quip-4bit to a GPTQ mix for QuIP#'s lattice codes)")
    p.add_argument("--calibration", help=".txt, .jsonl, .parquet or saved dataset folder (default: bundled text; "
                   "calibration-free methods such as rtn and hqq read none unless given this, --samples or --seq-len, "
                   "which then only feed the report's output errors)")
    add_calibration_mode(p)
    p.add_argument("--samples", type=int, help="calibration windows or samples (default 128)")
    p.add_argument("--seq-len", type=int, help="tokens per window, at most per sample (default min(context, 256))")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument("--target", choices=["vllm", "llama.cpp", "transformers"],
                   help="check, before any work, that this engine can serve the result (kernel limits per layer)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads(p)
    p.add_argument("--stream", action="store_true", help="read one decoder block at a time from the safetensors "
                   "shards and write it out as it is done: memory of one block, not the model; an interrupted run "
                   "resumes when the same command is run again; the output equals the in-memory run's byte for byte")
    p.add_argument("--ignore-memory", action="store_true", help="run even when the plan says the memory available "
                   "is not enough")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    p.set_defaults(run=_cmd_quantize)
    p = sub.add_parser("plan", help="what quantising a model folder needs (peak memory, disk, time) and whether it "
                       "fits this machine, from its config and shard headers alone")
    p.add_argument("model", nargs="?", default=None, help="Hugging Face model folder; omitted: the bundled model")
    add_method_flags(p)
    p.add_argument("--samples", type=int, help="calibration sequences (default 128 for methods that calibrate)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default min(context, 256))")
    p.add_argument("--stream", action="store_true", help="judge the fit for a --stream run (both peaks are printed)")
    p.add_argument("--no-probe", action="store_true", help="no time estimate (the probe runs the method on one "
                   "random block's shapes)")
    p.add_argument("--json", action="store_true", help="the plan as JSON (bytes and seconds)")
    p.set_defaults(run=_cmd_plan)
