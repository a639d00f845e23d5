"""`lowbit finetune`: quantise a model to NF4, train LoRA adapters on text, report held-out perplexity
before and after, and save the adapters as a PEFT folder."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.train.qlora import LoraSettings, TrainSettings, add_lora, save_adapter, train_lora

SUMMARY_FILE = "lowbit_finetune.json"


def quantized_base(model, quant: str, compute_dtype: str | None):
    """The model with its Linears in NF4/FP4: as loaded if it already is, else quantised with `quant`."""
    from lowbit.api import quantize
    from lowbit.methods import parse_method
    from lowbit.methods.nf4 import NF4
    from lowbit.weights.bnb4 import COMPUTE_DTYPES
    from lowbit.nn.linear4bit import Linear4bit

    held = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if held:
        for m in held:
            m.compute_dtype = COMPUTE_DTYPES[compute_dtype] if compute_dtype else m.compute_dtype
        return model, "as loaded"
    config = parse_method(quant)
    if not isinstance(config, NF4):
        raise LowbitError(f"QLoRA trains on an NF4/FP4 base; {quant!r} is not one (try nf4 or nf4-dq)")
    if compute_dtype:
        config = replace(config, compute_dtype=compute_dtype)
    return quantize(model, config, calibration=None, tokenizer=None, progress=False), config.short_name()


def token_ids(tokenizer, text: str, max_tokens: int | None = None, what: str = "eval text") -> torch.Tensor:
    from lowbit.eval.evaluate import tokenize

    return tokenize(tokenizer, text, max_tokens, what)


def held_out_perplexity(model, ids: torch.Tensor, context: int) -> float:
    from lowbit.eval.perplexity import perplexity

    with torch.no_grad():
        return perplexity(model, ids, context).perplexity


def finetune(path, out, lora: LoraSettings = LoraSettings(), train: TrainSettings = TrainSettings(),
             quant: str = "nf4-dq", compute_dtype: str | None = None, train_text: str | None = None,
             eval_text: str | None = None, max_eval_tokens: int = 16384, progress=None) -> dict:
    """QLoRA fine-tuning end to end. Returns the summary also written to OUT/lowbit_finetune.json."""
    from lowbit.api import load_model
    from lowbit.data import bundled_text
    from lowbit.eval.memory import model_memory
    from lowbit.eval.windows import model_context
    from lowbit.pipeline.loading import resolve_model_path

    if Path(out).exists():
        raise LowbitError(f"output folder already exists: {out}")
    base_path = resolve_model_path(path)
    model, tokenizer = load_model(path)
    if tokenizer is None:
        raise LowbitError(f"{base_path} has no tokenizer; fine-tuning needs one to read the text")
    model, quant_name = quantized_base(model, quant, compute_dtype)
    train_ids = token_ids(tokenizer, train_text if train_text is not None else bundled_text("train"),
                          what="training text")
    eval_ids = token_ids(tokenizer, eval_text if eval_text is not None else bundled_text("eval"), max_eval_tokens)
    context = model_context(model)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and train.seq_len > max_len:
        raise LowbitError(f"--seq-len {train.seq_len} is longer than the model's context ({max_len} tokens)")
    before = held_out_perplexity(model, eval_ids, context)
    names = add_lora(model, lora)
    result = train_lora(model, train_ids, train, progress)
    after = held_out_perplexity(model, eval_ids, context)
    memory = model_memory(model)
    summary = {
        "base_model": str(base_path), "quantization": quant_name, "adapted_modules": len(names),
        "lora": {**asdict(lora), "target_modules": list(lora.target_modules)}, "train": asdict(train),
        "train_tokens": int(train_ids.numel()), "eval_tokens": int(eval_ids.numel()), "eval_context": context,
        "perplexity_before": before, "perplexity_after": after, "train_seconds": result.seconds,
        "first_loss": result.losses[0], "last_loss": result.losses[-1],
        "mean_loss_last_10": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "memory_bytes": memory.deployed_bytes(2), "memory_held_bytes": memory.total_bytes,
        "adapter_parameters": sum(
            p.numel() for p in model.parameters() if p.requires_grad),
    }
    save_adapter(model, out, str(base_path), {SUMMARY_FILE: json.dumps(summary, indent=1)})
    return summary


def render_summary(s: dict, out) -> str:
    return (f"QLoRA on {s['base_model']} ({s['quantization']}): {s['adapted_modules']} Linears adapted, "
            f"rank {s['lora']['rank']}, {s['adapter_parameters']:,} trainable parameters\n"
            f"{s['train']['steps']} steps x {s['train']['batch_size']} x {s['train']['seq_len']} tokens in "
            f"{s['train_seconds']:.0f} s; loss {s['first_loss']:.3f} -> {s['mean_loss_last_10']:.3f} "
            f"(mean of the last 10)\n"
            f"held-out perplexity ({s['eval_tokens']} tokens, context {s['eval_context']}): "
            f"{s['perplexity_before']:.3f} before -> {s['perplexity_after']:.3f} after\n"
            f"adapters saved to {out} (PEFT: adapter_config.json + adapter_model.safetensors)")
