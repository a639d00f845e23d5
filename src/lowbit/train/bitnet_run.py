"""Running a BitNet b1.58 training: the model (from scratch or converted), the data, the shared loop
(train/loop.py), the conversion to real ternary weights and the numbers a user wants (steps, tokens, minutes,
held-out perplexity before and after).

The float baseline of benchmarks/bitnet_training.py runs through the same function with bitnet=False, so
the two differ only in BitLinear.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
from torch import nn

from lowbit.train.bitnet import to_bitnet, to_ternary
from lowbit.train.loop import History, LoopSettings, train_loop

EVAL_WINDOWS = 16        # held-out windows scored at each evaluation during training (the final one uses all)


def scratch_model(path=None, seed: int = 0):
    """(a randomly initialised float32 model with the architecture of the folder `path`, its tokenizer);
    path None: the bundled model's. Initialisation is transformers' own under torch.manual_seed(seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.pipeline.loading import load_tokenizer, resolve_model_path

    folder = resolve_model_path(path)
    tokenizer = _needs_tokenizer(load_tokenizer(folder), folder)
    config = AutoConfig.from_pretrained(str(folder))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def _needs_tokenizer(tokenizer, folder):
    from lowbit.errors import LowbitError

    if tokenizer is None:
        raise LowbitError(f"{folder} has no tokenizer; BitNet training needs one to read the text")
    return tokenizer


def source_model(path=None):
    """(the float model of `path` (None: the bundled model) in float32, its tokenizer) for conversion."""
    from lowbit.api import load_model
    from lowbit.pipeline.loading import resolve_model_path

    model, tok = load_model(path)
    return model.float(), _needs_tokenizer(tok, resolve_model_path(path))


def token_stream(tokenizer, split_or_text: str, is_split: bool = True, max_tokens: int | None = None,
                 what: str = "eval text") -> torch.Tensor:
    from lowbit.data import bundled_text
    from lowbit.train.finetune import token_ids

    text = bundled_text(split_or_text) if is_split else split_or_text
    return torch.as_tensor(token_ids(tokenizer, text, max_tokens, what)).reshape(-1)


def held_out(model: nn.Module, eval_ids: torch.Tensor, context: int, windows: int | None = None) -> float:
    """Perplexity on eval_ids cut in windows of `context` tokens (only the first `windows` when given)."""
    from lowbit.train.finetune import held_out_perplexity

    ids = eval_ids if windows is None else eval_ids[:windows * context]
    was_training = model.training
    model.eval()
    try:
        return held_out_perplexity(model, ids, context)
    finally:
        model.train(was_training)


def train_model(model: nn.Module, train_ids: torch.Tensor, eval_ids: torch.Tensor, settings: LoopSettings, *,
                bitnet: bool = True, packing: str = "trit5", checkpoint_dir=None, progress: bool = True,
                run: dict | None = None, measure_before: bool = True) -> tuple[nn.Module, dict, History]:
    """Train `model` (BitLinear in its blocks when bitnet, else as it is) and, for bitnet, convert it to
    TernaryLinear. Returns (model, summary, history); summary holds steps, tokens, minutes, the held-out
    perplexity of the float model given (ppl_float, bitnet only), before training (for bitnet: with its
    Linears ternarised, i.e. post-training BitNet), after training (for bitnet: fake-quantised) and of the
    converted ternary model, all on the full eval_ids in windows of settings.seq_len (measure_before=False
    skips the first: a model trained from scratch starts near the vocabulary size)."""
    context = settings.seq_len
    summary = {"bitnet": bitnet, "packing": packing if bitnet else None, "settings": asdict(settings)}
    if measure_before and bitnet:
        summary["ppl_float"] = held_out(model, eval_ids, context)
    if bitnet:
        to_bitnet(model, packing)
    if measure_before:
        summary["ppl_before"] = held_out(model, eval_ids, context)

    def evaluate(m):
        return math.log(held_out(m, eval_ids, context, EVAL_WINDOWS))

    run = {"trainer": "bitnet" if bitnet else "float", "packing": packing if bitnet else None, **(run or {})}
    history = train_loop(model, [p for p in model.parameters() if p.requires_grad], train_ids, settings,
                         checkpoint_dir=checkpoint_dir, run=run, evaluate=evaluate, progress=progress)
    summary.update(steps=history.steps_done, tokens=history.tokens, minutes=round(history.seconds / 60, 2),
                   stopped=history.stopped, tokens_per_second=round(history.tokens / max(history.seconds, 1e-9)))
    summary["ppl_trained"] = held_out(model, eval_ids, context)
    if bitnet:
        to_ternary(model)
        summary["ppl_ternary"] = held_out(model, eval_ids, context)
        summary["weight_bits"] = ternary_bits(model)
    return model, summary, history


def ternary_bits(model: nn.Module) -> dict:
    """Bytes and bits per weight of the ternary Linears as stored (packed codes and float16 scales)."""
    from lowbit.weights.ternary import TernaryWeight

    weights = [m.quantized() for m in model.modules() if callable(getattr(m, "quantized", None))]
    weights = [w for w in weights if isinstance(w, TernaryWeight)]
    nbytes, numel = sum(w.nbytes for w in weights), sum(w.numel for w in weights)
    return {"tensors": len(weights), "weights": numel, "bytes": nbytes, "bits_per_weight": 8 * nbytes / max(numel, 1)}
