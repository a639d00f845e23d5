"""An outlier test-bed: a variant of a model whose Linears see "emergent" outlier channels.

Large LLMs grow a few hidden dimensions 20-100x larger than the rest (Dettmers et al., LLM.int8();
Xiao et al., SmoothQuant), which is what breaks per-tensor and per-token int8 activations. A small
model trained briefly has none, so this module plants them without changing the model's function:
for a few channels j, the producer of a Linear group's input is multiplied by `factor` in channel j
and the group's weight columns j are divided by it (pipeline/fold.py, with s_j = 1 / factor).

The producers are the norms in front of attention and MLP (so q/k/v and gate/up read hidden channels
`channels`), and, through attention and the gated MLP, v_proj and up_proj (so o_proj and down_proj read
channels `inner_channels` of their own width). The residual stream itself is left alone: scaling it
would change what an RMSNorm divides by. The full-precision logits agree with the original to float
rounding; the activations entering the Linears carry max|x| about `factor` times larger in those channels.
"""
from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.pipeline.arch import block_list, describe
from lowbit.pipeline.fold import block_linears, foldable_groups, fold_scales
from lowbit.pipeline.loading import conv1d_to_linear

DEFAULT_CHANNELS = (7, 61, 133, 202)     # 4 of 256 hidden channels, about the share seen in OPT-6.7B
DEFAULT_FACTOR = 50.0


def _check(channels, factor: float, width: int, where: str) -> list[int]:
    if not (isinstance(factor, (int, float)) and 0 < factor < float("inf")):
        raise LowbitError(f"outlier factor must be a finite positive number, got {factor!r}")
    if any(int(c) < 0 for c in channels):
        raise LowbitError(f"outlier channels must be non-negative indices, got {list(channels)} for {where}")
    return sorted({int(c) % width for c in channels})


def outlier_scale(width: int, channels, factor: float) -> torch.Tensor:
    """The folded scale: s_j = 1/factor on the outlier channels (the producer is divided by s), else 1."""
    s = torch.ones(width, dtype=torch.float64)
    s[list(channels)] = 1.0 / factor
    return s


def make_outlier_variant(model: nn.Module, channels=DEFAULT_CHANNELS, factor: float = DEFAULT_FACTOR,
                         inner_channels=None, inplace: bool = False) -> nn.Module:
    """A copy of `model` (or the model itself, inplace=True) with outlier channels planted in every block.

    channels: indices into the width of each norm-fed group's input (taken modulo that width);
    inner_channels: the same for groups fed by a preceding Linear (o_proj, down_proj); None reuses
    `channels`; () plants none there. Channels are in the producer's space: under GQA a v_proj channel
    shows up in every o_proj column that reads it. Returns the model, with `lowbit_outliers` recording
    what was planted.
    """
    if not inplace:
        model = copy.deepcopy(model)
    conv1d_to_linear(model)  # GPT-2's transposed Conv1D Linears, as the quantisation pipeline sees them
    arch = describe(model)
    _, blocks = block_list(model, arch)
    inner = channels if inner_channels is None else inner_channels
    planted = []
    for i, block in enumerate(blocks):
        linears = block_linears(block)
        for group, source in foldable_groups(block, arch, list(linears)):
            wanted = channels if source.kind == "norm" else inner
            if not len(wanted):
                continue
            chans = _check(wanted, factor, source.width, f"{source.name} of block {i}")
            fold_scales(source, [linears[n] for n in group], outlier_scale(source.width, chans, factor))
            planted.append({"block": i, "producer": source.name, "group": list(group), "channels": chans})
    if not planted:
        raise LowbitError(f"no foldable Linear groups in this {arch.family} model: cannot plant outliers")
    model.lowbit_outliers = {"factor": float(factor), "planted": planted}
    return model


# ---------------------------------------------------------------------------------------------------
# The demo: int8 activation methods on the bundled model and on its outlier variant

DEMO_METHODS = ("w8a8-static", "w8a8", "llm-int8", "smoothquant")


def outlier_comparison(model_path=None, methods=DEMO_METHODS, channels=DEFAULT_CHANNELS,
                       factor: float = DEFAULT_FACTOR, n_samples: int = 32, max_eval_tokens: int = 16384,
                       progress=None) -> list[dict]:
    """Held-out perplexity of each method on the model and on its outlier variant: one row per
    (model, method), with the change against that model's full precision and, for LLM.int8(), the
    fraction of input columns it multiplied in floating point during the evaluation."""
    from lowbit import api
    from lowbit.eval.evaluate import bundled_eval_text, tokenize
    from lowbit.eval.perplexity import perplexity
    from lowbit.methods import parse_method
    from lowbit.nn.w8a8 import Int8MixedLinear, outlier_fraction, reset_outlier_counts

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
    from lowbit.table import format_table

    table = [[r["model"], r["method"], r["perplexity"], f"{100 * r['change']:+.2f}%",
              "" if r["float_columns"] is None else f"{100 * r['float_columns']:.2f}%"] for r in rows]
    return format_table(["model", "method", "perplexity", "vs fp32", "columns in float"], table)


def render_demo() -> str:
    rows = outlier_comparison(progress=lambda m: print(m, file=sys.stderr, flush=True))
    return ("Int8 activations and emergent outliers: the bundled model, and its variant whose Linears all read "
            f"channels {list(DEFAULT_CHANNELS)} of their input\nscaled x{DEFAULT_FACTOR:g} (the same full-precision "
            "function; held-out perplexity, 16K tokens)\n" + render_outlier_comparison(rows))
