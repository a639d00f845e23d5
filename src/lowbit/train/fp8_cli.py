"""`lowbit train-fp8`: FP8 training (delayed scaling) of a causal LM on text, or the BF16 baseline run."""
from __future__ import annotations

from pathlib import Path

from lowbit.train.cli import (_non_negative_int, _positive_int, _read_text, add_run_arguments, add_schedule_arguments,
                              loop_settings)


def checkpoint_folder(args) -> Path:
    return Path(args.checkpoint_dir) if args.checkpoint_dir else Path(f"{args.output}.checkpoints")


def _cmd_train_fp8(args) -> str:
    import shutil

    from lowbit.io.atomic import check_output
    from lowbit.train.fp8_run import render_summary, save_run, train_precision
    from lowbit.train.fp8_scaling import DelayedScaling
    from lowbit.train.loop import latest_checkpoint

    check_output(args.output, "output folder")   # before any training
    recipe = DelayedScaling(args.margin, args.history_len, args.amax_algo)
    settings = loop_settings(args, warmup=min(args.warmup, args.steps), min_lr_ratio=args.min_lr_ratio,
                             weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm)
    folder = checkpoint_folder(args)
    try:
        model, tokenizer, history, summary = train_precision(
            args.precision, settings, recipe, path=args.path, scratch=args.scratch, checkpoint_dir=folder,
            backend=args.backend, train_text=_read_text(args.train_file), eval_text=_read_text(args.eval_file),
            progress=not args.quiet)
    except KeyboardInterrupt as e:
        last = latest_checkpoint(folder)
        if last is not None:
            e.hint = f"lowbit: interrupted; run the same command again to resume from {last}"
        raise
    save_run(args.output, model, tokenizer, history, summary)
    shutil.rmtree(folder, ignore_errors=True)   # the run is complete: nothing left to resume
    return render_summary(summary, args.output)


def register(sub) -> None:
    p = sub.add_parser("train-fp8", help="train with the decoder Linears in FP8 (E4M3 forward, E5M2 backward, "
                                         "delayed scaling), or the same run in BF16")
    p.add_argument("path", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("-o", "--output", required=True, help="folder to write: model, loss curve, summary")
    p.add_argument("--precision", choices=["fp8", "bf16"], default="fp8", help="fp8 (default) or the bf16 baseline")
    p.add_argument("--scratch", action="store_true", help="re-initialise the weights from the config (seeded)")
    add_schedule_arguments(p, steps=300, lr=2e-3, batch_size=16, warmup=30)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr (0.1)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (0.1)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="random seed: initialisation and data order (default 0)")
    p.add_argument("--history-len", type=_positive_int, default=16, help="amax history length (default 16)")
    p.add_argument("--margin", type=_non_negative_int, default=0, help="scale margin: scales / 2**margin (0)")
    p.add_argument("--amax-algo", choices=["max", "most_recent"], default="max", help="amax from the history")
    p.add_argument("--backend", choices=["auto", "emulated", "scaled_mm"], default="auto",
                   help="FP8 matmuls: auto (torch._scaled_mm on a GPU, exact float32 emulation on CPU)")
    add_run_arguments(p, checkpoint_every=25)
    p.set_defaults(run=_cmd_train_fp8)
