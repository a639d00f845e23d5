"""`lowbit finetune`: QLoRA on the bundled model (or any HF / lowbit NF4 model folder)."""
from __future__ import annotations

import argparse
import sys

from lowbit.train.qlora import DEFAULT_TARGETS, LoraSettings, TrainSettings


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, else argparse's one-line error."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v
    return parse


_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)


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


def short_warmup(args) -> int:
    """--warmup, but at most a quarter of --steps: a run no longer than its warm-up would never decay."""
    return min(args.warmup, args.steps // 4)


def loop_settings(args, **fields):
    """The shared loop's settings from the options add_schedule_arguments and add_run_arguments define;
    `fields` sets the rest (warmup, weight decay ...) as each trainer needs."""
    from lowbit.train.loop import LoopSettings

    common = dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                  eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                  log_every=0 if args.quiet else args.log_every, minutes=args.minutes, threads=args.threads)
    return LoopSettings(**{**common, **fields})


def _cmd_qat(args) -> str:
    from lowbit.io.atomic import check_output
    from lowbit.train.qat import QATSettings
    from lowbit.train.qat_run import QATJob, render, run_qat

    check_output(args.output, "output folder")  # before any training
    loop = loop_settings(args, seq_len=args.seq_len or 256, warmup=short_warmup(args))
    job = QATJob(args.path, args.scheme, args.output, not args.no_distill, args.init, _read_text(args.train_file),
                 _read_text(args.eval_file), args.checkpoint_dir, fit_context=args.seq_len is None)
    summary = run_qat(job, loop, QATSettings(not args.fixed_scales, args.act_bits), progress=not args.quiet)
    return render(summary, args.output)


def register_qat(sub) -> None:
    p = sub.add_parser("qat", help="quantisation-aware training: fake quantisation + STE, then real quantised weights")
    p.add_argument("path", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("-o", "--output", required=True, help="native lowbit folder to write (must not exist)")
    p.add_argument("--scheme", default="int4-g128",
                   help="weight scheme in short words: int4-g128, int3-g128, int2-g64, uint4-g64, nf4-g64, fp8_e4m3, "
                        "mxfp4, int8-sfp32 ... (default int4-g128)")
    add_schedule_arguments(p, steps=150, lr=2e-4, batch_size=8, warmup=20, seq_len=None,
                           seq_len_help="default 256, or the model's context if shorter")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data order (default 0)")
    p.add_argument("--no-distill", action="store_true",
                   help="train on the text's next tokens instead of matching the float model's next-token "
                        "distribution (KL, the default)")
    p.add_argument("--init", choices=["gptq", "rtn"], default="gptq",
                   help="start from GPTQ's solution, its weights and scales (default), or from round-to-nearest")
    p.add_argument("--fixed-scales", action="store_true", help="min-max scales every step instead of learned (LSQ)")
    p.add_argument("--act-bits", type=int, choices=[8], help="also fake-quantise activations per token (int8; "
                                                              "converts to W8A8, needs --scheme int8-sfp32)")
    add_run_arguments(p, "the bundled calibration text, which GPTQ reads too")
    p.set_defaults(run=_cmd_qat)


def add_schedule_arguments(p, *, steps: int, lr: float, batch_size: int, warmup: int, seq_len: int | None = 256,
                           seq_len_help: str = "default 256") -> None:
    """--steps, --lr, --batch-size, --seq-len, --warmup with a trainer's own defaults."""
    p.add_argument("--steps", type=_positive_int, default=steps, help=f"optimiser steps (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--batch-size", type=_positive_int, default=batch_size,
                   help=f"sequences per step (default {batch_size})")
    p.add_argument("--seq-len", type=_positive_int, default=seq_len, help=f"tokens per sequence ({seq_len_help})")
    p.add_argument("--warmup", type=_non_negative_int, default=warmup,
                   help=f"linear warm-up steps, then cosine decay (default {warmup})")


def add_run_arguments(p, train_default: str = "the bundled training text", checkpoint_every: int = 50) -> None:
    """The options every trainer on the shared loop takes after its own: time, threads, evaluation,
    checkpoints (resume), progress and the texts (qat, bitnet)."""
    p.add_argument("--minutes", type=float, help="stop training after this many minutes")
    p.add_argument("--threads", type=_positive_int, help="torch threads while training (default: as set)")
    p.add_argument("--eval-every", type=_non_negative_int, default=50,
                   help="held-out loss every N steps (default 50; 0: at the end only)")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=checkpoint_every,
                   help=f"checkpoint every N steps (default {checkpoint_every}; 0: at the end only)")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default OUTPUT.checkpoints); run the same "
                                            "command again to resume from the last one")
    p.add_argument("--log-every", type=_positive_int, default=10, help="progress line every N steps (default 10)")
    p.add_argument("--train-file", help=f"training text (default: {train_default})")
    p.add_argument("--eval-file", help="held-out text (default: the bundled eval text)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def register(sub) -> None:
    register_qat(sub)
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
