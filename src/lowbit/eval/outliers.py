"""The outlier demo: int8 activation methods on the bundled model and on its outlier variant
(lowbit.pipeline.outliers plants the outlier channels)."""
from __future__ import annotations

import copy
import sys

from lowbit import api
from lowbit.eval.evaluate import bundled_eval_text, tokenize
from lowbit.eval.perplexity import perplexity
from lowbit.methods import parse_method
from lowbit.nn.w8a8 import Int8MixedLinear, outlier_fraction, reset_outlier_counts
from lowbit.pipeline.outliers import DEFAULT_CHANNELS, DEFAULT_FACTOR, make_outlier_variant
from lowbit.table import format_table

DEMO_METHODS = ("w8a8-static", "w8a8", "llm-int8", "smoothquant")


def outlier_comparison(model_path=None, methods=DEMO_METHODS, channels=DEFAULT_CHANNELS,
                       factor: float = DEFAULT_FACTOR, n_samples: int = 32, max_eval_tokens: int = 16384,
                       progress=None) -> list[dict]:
    """Held-out perplexity of each method on the model and on its outlier variant: one row per
    (model, method), with the change against that model's full precision and, for LLM.int8(), the
    fraction of input columns it multiplied in floating point during the evaluation."""
    configs = [parse_method(m) for m in methods]   # a typo fails before any work
    say = progress or (lambda message: None)
    base, tokenizer = api.load_model(model_path)
    ids = tokenize(tokenizer, bundled_eval_text(), max_eval_tokens)
    rows = []
    for label, model in (("plain", base), (f"outliers x{factor:g}", make_outlier_variant(base, channels, factor))):
        fp = perplexity(model, ids).perplexity
        rows.append({"model": label, "method": "fp32", "perplexity": fp, "change": 0.0, "float_columns": None})
        for config in configs:
            say(f"{label}: {config.short_name()}")
            q = api.quantize(copy.deepcopy(model), config, tokenizer=tokenizer, n_samples=n_samples, progress=False)
            reset_outlier_counts(q)
            ppl = perplexity(q, ids).perplexity
            mixed = any(isinstance(m, Int8MixedLinear) for m in q.modules())
            rows.append({"model": label, "method": config.short_name(), "perplexity": ppl, "change": ppl / fp - 1,
                         "float_columns": outlier_fraction(q) if mixed else None})
    return rows


def render_outlier_comparison(rows: list[dict]) -> str:
    table = [[r["model"], r["method"], r["perplexity"], f"{100 * r['change']:+.2f}%",
              "" if r["float_columns"] is None else f"{100 * r['float_columns']:.2f}%"] for r in rows]
    return format_table(["model", "method", "perplexity", "vs fp32", "columns in float"], table)


def render_demo() -> str:
    rows = outlier_comparison(progress=lambda m: print(m, file=sys.stderr, flush=True))
    return ("Int8 activations and emergent outliers: the bundled model, and its variant whose Linears all read "
            f"channels {list(DEFAULT_CHANNELS)} of their input\nscaled x{DEFAULT_FACTOR:g} (the same full-precision "
            "function; held-out perplexity, 16K tokens)\n" + render_outlier_comparison(rows))
