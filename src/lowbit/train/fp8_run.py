"""`lowbit train-fp8`: train a causal LM with its decoder Linears in FP8 (delayed scaling), or the same run in
BF16 as the baseline, on the bundled text; report the held-out loss, write the loss curve and the model.

Both precisions share everything else: the data order, the initialisation (same seed), AdamW with float32
state over float32 master weights, bf16 autocast for the rest of the model (attention, norms, lm_head),
the learning-rate schedule. The FP8 run adds a dynamic loss scaler (torch.amp.GradScaler: x0.5 and a
skipped step on inf/NaN gradients, x2 after 2000 clean steps).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.train.fp8_linear import convert_to_fp8_training, restore_linears
from lowbit.train.fp8_scaling import DelayedScaling
from lowbit.train.loop import LoopSettings, train_loop, write_loss_curve

PRECISIONS = ("fp8", "bf16")
SUMMARY_FILE, CURVE_FILE = "lowbit_fp8_train.json", "loss_curve.png"


def build_model(path=None, scratch: bool = False, seed: int = 0):
    """(float32 model, tokenizer) from a model folder (None: the bundled model); `scratch` re-initialises
    the weights from its config with `seed` instead of loading them."""
    from lowbit.api import load_model

    model, tokenizer = load_model(path)
    if tokenizer is None:
        raise LowbitError("training needs the model folder's tokenizer to read the text")
    if scratch:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    return model, tokenizer


def make_optimizer(model, settings: LoopSettings) -> torch.optim.AdamW:
    """AdamW as the bundled model was trained: betas (0.9, 0.95), no weight decay on 1-D tensors (norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)


def held_out_loss(model, ids: torch.Tensor, context: int) -> float:
    """Mean next-token NLL (nats) over non-overlapping windows of `context` tokens of `ids`."""
    from lowbit.eval.perplexity import perplexity

    with torch.no_grad():
        return perplexity(model, ids, context).nll


def train_precision(precision: str, settings: LoopSettings, recipe: DelayedScaling = DelayedScaling(), *,
                    path=None, scratch: bool = False, checkpoint_dir=None, backend: str = "auto",
                    train_text: str | None = None, eval_text: str | None = None, progress: bool = True):
    """Train in `precision` ("fp8" or "bf16") with the shared loop. Returns (model, tokenizer, History,
    summary dict). The model comes back with its FP8 Linears in place (evaluated as trained)."""
    from lowbit.data import bundled_text
    from lowbit.eval.evaluate import tokenize

    if precision not in PRECISIONS:
        raise LowbitError(f"unknown precision {precision!r}; choose {' or '.join(PRECISIONS)}")
    model, tokenizer = build_model(path, scratch, settings.seed)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and settings.seq_len > max_len:
        raise LowbitError(f"--seq-len {settings.seq_len} is longer than the model's context ({max_len} tokens)")
    fp8 = precision == "fp8"
    converted = convert_to_fp8_training(model, recipe, backend) if fp8 else []
    train_ids = tokenize(tokenizer, train_text if train_text is not None else bundled_text("train"),
                         what="training text")
    eval_ids = tokenize(tokenizer, eval_text if eval_text is not None else bundled_text("eval"))
    run = {"precision": precision, "model": str(path) if path else "bundled", "scratch": scratch,
           "recipe": asdict(recipe) if fp8 else None}
    device = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device) if fp8 else None
    history = train_loop(model, model.parameters(), train_ids, settings, checkpoint_dir=checkpoint_dir, run=run,
                         evaluate=lambda m: held_out_loss(m, eval_ids, settings.seq_len), progress=progress,
                         scaler=scaler, autocast_dtype=torch.bfloat16, optimizer=make_optimizer(model, settings))
    final = history.evals[-1][1]
    summary = {**run, "fp8_linears": len(converted), "settings": asdict(settings), "steps": history.steps_done,
               "tokens": history.tokens, "train_seconds": round(history.seconds, 1), "stopped": history.stopped,
               "final_train_loss_mean10": sum(v for _, v in history.losses[-10:]) / len(history.losses[-10:]),
               "final_eval_loss": final, "final_eval_perplexity": math.exp(final),
               "eval_tokens": int(eval_ids.numel()), "eval_context": settings.seq_len,
               "loss_scale": scaler.get_scale() if scaler is not None else None}
    if fp8:   # the float32 master weights without the FP8 casts, for reference
        restore_linears(model)
        summary["final_eval_loss_master_fp32"] = held_out_loss(model, eval_ids, settings.seq_len)
    return model, tokenizer, history, summary


def save_run(out, model, tokenizer, history, summary: dict) -> Path:
    """OUT/: the trained model (plain nn.Linears, float32 master weights) as a Hugging Face folder, its
    tokenizer, the summary JSON and the loss curve PNG; written to a temporary folder, then renamed."""
    from lowbit.io.atomic import atomic_output

    restore_linears(model)
    with atomic_output(out, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps({**summary, "history": history.to_json()}, indent=1))
        write_loss_curve(tmp / CURVE_FILE, {summary["precision"].upper(): history},
                         title=f"{summary['precision'].upper()} training loss")
    return Path(out)


def render_summary(s: dict, out) -> str:
    st = s["settings"]
    what = f"FP8 (E4M3/E5M2, {s['fp8_linears']} Linears)" if s["precision"] == "fp8" else "BF16"
    lines = [f"{what}: {s['steps']} steps x {st['batch_size']} x {st['seq_len']} tokens in "
             f"{s['train_seconds'] / 60:.1f} min; train loss {s['final_train_loss_mean10']:.4f} (mean of the last 10)",
             f"held-out loss {s['final_eval_loss']:.4f} (perplexity {s['final_eval_perplexity']:.2f}, "
             f"{s['eval_tokens']} tokens, windows of {s['eval_context']})"]
    if "final_eval_loss_master_fp32" in s:
        lines.append(f"float32 master weights without FP8 casts: held-out loss {s['final_eval_loss_master_fp32']:.4f}")
    lines.append(f"saved to {out} ({SUMMARY_FILE}, {CURVE_FILE}, model)")
    return "\n".join(lines)
