"""`lowbit finetune`: QLoRA on the bundled model (or any HF / lowbit NF4 model folder)."""
from __future__ import annotations

import argparse
import sys

from lowbit.train.qlora import DEFAULT_TARGETS, LoraSettings, TrainSettings


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _read_text(path):
    if path is None:
        return None
    from pathlib import Path

    from lowbit.errors import LowbitError

    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read {path}: {e}")


def _cmd_finetune(args) -> str:
    from lowbit.io.atomic import check_output
    from lowbit.train.finetune import finetune, render_summary

    check_output(args.output, "adapter folder")  # before any training

    lora = LoraSettings(args.rank, args.alpha, args.dropout,
                        tuple(t.strip() for t in args.target.split(",") if t.strip()), args.seed)
    train = TrainSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                          warmup=min(args.warmup, args.steps), seed=args.seed,
                          gradient_checkpointing=args.gradient_checkpointing)
    every = max(1, args.steps // 10)

    def progress(step, loss):
        if not args.quiet and (step % every == 0 or step == args.steps - 1):
            print(f"step {step + 1}/{args.steps}  loss {loss:.4f}", file=sys.stderr)

    summary = finetune(args.path, args.output, lora, train, args.quant, args.compute_dtype,
                       _read_text(args.train_file), _read_text(args.eval_file), progress=progress)
    return render_summary(summary, args.output)


def register(sub) -> None:
    p = sub.add_parser("finetune", help="QLoRA: LoRA adapters trained on a frozen NF4 base, saved for PEFT")
    p.add_argument("path", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("-o", "--output", required=True, help="adapter folder to write (must not exist)")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA scaling alpha (default 16)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--target", default=",".join(DEFAULT_TARGETS), help="comma-separated Linear names")
    p.add_argument("--steps", type=_positive_int, default=200, help="optimiser steps (default 200)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quant", default="nf4-dq", help="the base's 4-bit scheme when the model is not NF4 yet")
    p.add_argument("--compute-dtype", choices=["bf16", "fp32", "fp16"],
                   help="dtype the 4-bit Linears multiply in (default: as --quant says, bf16 unless it ends in "
                        "-fp32/-fp16; bf16 trains ~1.3x faster than fp32 on an AVX512-BF16 CPU). Adapters are fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, slower")
    p.add_argument("--train-file", help="training text (default: the bundled training text)")
    p.add_argument("--eval-file", help="held-out text (default: the bundled eval text)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=_cmd_finetune)
