"""compare(): quantise one base model with several methods and evaluate each against the same reference.

Every row is scored on the same windows of held-out text, against log-probs of the unquantised model
computed once, so perplexity, delta-PPL and KL are comparable across rows.
"""
from __future__ import annotations

import copy
import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable

from lowbit.errors import LowbitError
from lowbit.eval.evaluate import DEFAULT_MAX_EVAL_TOKENS, eval_windows, evaluate
from lowbit.eval.fidelity import DEFAULT_MAX_FIDELITY_TOKENS, build_reference
from lowbit.pipeline.calibration import needs_calibration

# Unquantised rows: the base model itself, its memory counted at this many bytes per weight.
BASELINES = {"fp16": 2, "fp32": 4}
DEFAULT_METHODS = ("fp16", "rtn-int8", "rtn-int4-g128")


@dataclass(frozen=True)
class Planned:
    name: str             # as the row shows it
    config: object        # a MethodConfig or a Recipe (one config per Linear), or None for an unquantised baseline

    @property
    def float_bytes(self) -> int:
        return BASELINES.get(self.name, 2)


def parse_methods(methods) -> list[Planned]:
    """'fp16,rtn-int8' or a list of names (or of Planned rows, e.g. a budgeted Recipe under a name) -> one
    entry per method; an unknown name is a LowbitError."""
    from lowbit.methods import parse_method
    from lowbit.methods.recipe import Recipe

    items = methods.split(",") if isinstance(methods, str) else list(methods)
    items = [n if isinstance(n, Planned) else n.strip().lower() for n in items
             if isinstance(n, Planned) or n.strip()]
    if not items:
        raise LowbitError("no methods to compare; pass e.g. --methods fp16,rtn-int8,rtn-int4-g128")
    plan = [n if isinstance(n, Planned) else Planned(n, None if n in BASELINES else parse_method(n)) for n in items]
    trained = [p.name for p in plan if p.config is not None
               and any(c.trains for c in (p.config.configs() if isinstance(p.config, Recipe) else [p.config]))]
    if trained:
        raise LowbitError(f"{trained[0]} is trained, not solved: run `lowbit qat` and compare its folder with "
                          f"`lowbit eval`")
    seen: dict = {}
    for p in plan:
        key = p.name if p.config is None or isinstance(p.config, Recipe) else p.config   # Recipes: by name
        if key in seen:
            same = f"{p.name} is listed twice" if seen[key] == p.name else f"{seen[key]} and {p.name} are the same method, listed twice"
            raise LowbitError(f"{same}; list it once")
        seen[key] = p.name
    return plan


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compare(methods, model_path=None, calibration=None, *, text: str | None = None, context: int | None = None,
            max_eval_tokens: int | None = DEFAULT_MAX_EVAL_TOKENS,
            max_fidelity_tokens: int = DEFAULT_MAX_FIDELITY_TOKENS, n_samples: int | None = None,
            seq_len: int | None = None, seed: int = 0, speed: bool = True, calibration_mode: str = "auto",
            progress: Callable[[str], None] | None = stderr_progress, trust_remote_code: bool = False,
            loaded: tuple | None = None) -> list[dict]:
    """One row per method (see evaluate() for the fields, plus method, quantize_s and config).

    methods: names such as "fp16", "rtn-int8", "rtn-int4-g128" (a comma-separated string or a list, which
    may hold Planned rows: a name with its config or Recipe).
    model_path: a HF model folder, or None for the bundled model. text: held-out text (default: the
    bundled eval text). calibration, n_samples, seq_len, seed, calibration_mode: passed to lowbit.api.quantize.
    loaded: (model, tokenizer) already loaded from model_path, used as the unquantised base instead of
    loading it again (each row quantises a copy).
    """
    from lowbit import api

    plan = parse_methods(methods)  # before any loading: a typo fails in a second, not after minutes
    say = progress or (lambda message: None)
    base, tokenizer = loaded or api.load_model(model_path, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise LowbitError(f"the model folder {model_path or 'of the bundled model'} has no tokenizer; "
                          "evaluation on text needs one")
    windows = eval_windows(base, tokenizer, text, context=context, max_eval_tokens=max_eval_tokens)
    say(f"reference: scoring the unquantised model on {windows.n_tokens} tokens")
    reference = build_reference(base, windows, max_fidelity_tokens=max_fidelity_tokens)
    options = {"calibration": calibration, "seed": seed, "calibration_mode": calibration_mode,
               **{k: v for k, v in (("n_samples", n_samples), ("seq_len", seq_len)) if v is not None}}
    rows = []
    for i, item in enumerate(plan, 1):
        say(f"[{i}/{len(plan)}] {item.name}")
        model, quantize_s = base, 0.0
        if item.config is not None:
            model, quantize_s = quantised_copy(base, item.config, tokenizer, options)
        row = {"method": item.name, **evaluate(model, reference=reference, speed=speed, float_bytes=item.float_bytes),
               "quantize_s": quantize_s, "config": item.config.to_dict() if item.config else {"method": item.name}}
        del model
        gc.collect()
        say(f"[{i}/{len(plan)}] {item.name}: perplexity {row['perplexity']:.4g}, KL {row['kl']:.4g}, "
            f"{row['bits_per_weight']:.3g} bits/weight")
        rows.append(row)
    return rows


def quantised_copy(base, config, tokenizer, options: dict):
    """(a quantised copy of `base`, seconds spent quantising); `base` stays the unquantised reference."""
    from lowbit import api

    model = copy.deepcopy(base)
    if not needs_calibration(config):
        # lowbit.api quantises without a calibration pass when given neither data nor a tokenizer
        options, tokenizer = {**options, "calibration": None}, None
    start = time.perf_counter()
    api.quantize(model, config, tokenizer=tokenizer, progress=False, **options)
    return model, time.perf_counter() - start
