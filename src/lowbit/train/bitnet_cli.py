"""`lowbit bitnet`: BitNet b1.58 training, by conversion of a float model (continued training) or from scratch.

    lowbit bitnet -o tiny-bitnet                       # convert the bundled model, 300 steps
    lowbit bitnet MODEL -o OUT --from-scratch --minutes 10
    lowbit eval OUT ; lowbit export OUT --format gguf -o OUT.gguf      # TQ1_0 (or TQ2_0 with --packing 2bit)

The output is a native lowbit folder holding real ternary weights (TernaryLinear); checkpoints go to
OUT.checkpoints and running the same command again resumes from the last one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from lowbit.train.cli import _read_text, add_run_arguments, add_schedule_arguments, loop_settings, short_warmup

SUMMARY_FILE, CURVE_FILE = "lowbit_bitnet.json", "bitnet_loss.png"


def _cmd_bitnet(args) -> str:
    from lowbit.io.atomic import check_output
    from lowbit.io.native import save
    from lowbit.train.bitnet_run import scratch_model, source_model, token_stream, train_model
    from lowbit.train.loop import check_seq_len, write_loss_curve
    from lowbit.weights.ternary import check_packing

    out = check_output(args.output, "output folder")   # before any training
    check_packing(args.packing)
    settings = loop_settings(args, warmup=short_warmup(args), weight_decay=args.weight_decay)
    model, tok = scratch_model(args.path, args.seed) if args.from_scratch else source_model(args.path)
    train_text, eval_text = _read_text(args.train_file), _read_text(args.eval_file)
    check_seq_len(model, settings.seq_len)   # before the float model is scored
    train_ids = (token_stream(tok, train_text, False, what="training text") if train_text is not None
                 else token_stream(tok, "train", what="training text"))
    eval_ids = token_stream(tok, eval_text, False) if eval_text is not None else token_stream(tok, "eval")
    checkpoints = Path(args.checkpoint_dir or f"{out}.checkpoints")
    run = {"model": str(args.path or "bundled"), "from_scratch": args.from_scratch}
    model, summary, history = train_model(model, train_ids, eval_ids, settings, packing=args.packing,
                                          checkpoint_dir=checkpoints, progress=not args.quiet, run=run,
                                          measure_before=not args.from_scratch)

    def beside(folder: Path) -> None:   # inside the folder's atomic write: all of it appears, or none
        (folder / SUMMARY_FILE).write_text(json.dumps({**summary, "history": history.to_json()}, indent=1))
        write_loss_curve(folder / CURVE_FILE, {"bitnet": history}, title="BitNet b1.58 training")

    save(model, out, tok, extra=beside)
    curve = out / CURVE_FILE if (out / CURVE_FILE).exists() else None
    shutil.rmtree(checkpoints, ignore_errors=True)   # the run is complete: nothing left to resume (as qat, train-fp8)
    return json.dumps(summary, indent=1) if args.json else render(summary, out, curve)


def render(s: dict, out, curve) -> str:
    bits = s["weight_bits"]
    lines = [f"trained {s['steps']} steps, {s['tokens']:,} tokens in {s['minutes']} min "
             f"({s['tokens_per_second']:,} tokens/s; stopped by {s['stopped']})"]
    if "ppl_before" in s:
        lines.append(f"held-out perplexity of the float model: {s['ppl_float']:.2f}; ternarised before training: "
                     f"{s['ppl_before']:.2f}")
    lines += [f"held-out perplexity after:  {s['ppl_ternary']:.2f} (ternary weights; {s['ppl_trained']:.2f} "
              f"fake-quantised)",
              f"ternary Linears: {bits['bytes']:,} bytes for {bits['weights']:,} weights = "
              f"{bits['bits_per_weight']:.4f} bits per weight ({s['packing']})",
              f"saved to {out} ({SUMMARY_FILE}" + (f", {CURVE_FILE}" if curve else "") + " beside the weights)"]
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("bitnet", help="BitNet b1.58: train ternary weights (convert a float model or from scratch)")
    p.add_argument("path", nargs="?", default=None, help="model folder (default: the bundled model)")
    p.add_argument("-o", "--output", required=True, help="native lowbit folder to write (must not exist)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train a randomly initialised model of the folder's architecture instead of converting it")
    p.add_argument("--packing", default="trit5", help="trit5 (5 codes per byte, 1.6 bits; GGUF TQ1_0) or 2bit "
                                                      "(GGUF TQ2_0) (default trit5)")
    add_schedule_arguments(p, steps=300, lr=1e-3, batch_size=8, warmup=20)
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and of a scratch model (default 0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_run_arguments(p)
    p.set_defaults(run=_cmd_bitnet)
