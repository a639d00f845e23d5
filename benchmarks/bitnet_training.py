"""BitNet b1.58 against float: the bundled model's architecture trained from scratch on the bundled corpus,
both for the same wall-clock budget, side by side, and their held-out perplexity.

    .venv/bin/python benchmarks/bitnet_training.py --minutes 10 --out /tmp/bitnet-vs-float

The two trainings run at the same time, one torch thread each, in two processes (so load on the machine
falls on both alike), with the same seed, initial weights, data order, batch, learning rate and schedule
(train/bitnet_run.train_model; the only difference is BitLinear in the decoder blocks). Each first runs a few
calibration steps to measure its own seconds per step, then gets as many steps as fit its budget so that
its cosine schedule ends when the time does (--minutes also stops it hard). Training time excludes
evaluation. Held-out perplexity: the whole bundled eval text in 256-token windows; for BitNet, of the model
converted to real ternary weights (TernaryLinear). Writes OUT/summary.json, OUT/loss.png, and with --save the
BitNet model as a native lowbit folder (OUT/bitnet-model).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def settings(args, steps: int, minutes: float | None):
    from lowbit.train.loop import LoopSettings

    return LoopSettings(steps=steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                        warmup=min(args.warmup, max(steps // 10, 1)), min_lr_ratio=0.1, weight_decay=0.1,
                        max_grad_norm=1.0, seed=args.seed, eval_every=args.eval_every, checkpoint_every=0,
                        log_every=25, minutes=minutes, threads=1)


def worker(args) -> None:
    """One training (float or bitnet) in this process; writes its summary and history as JSON."""
    import torch

    torch.set_num_threads(1)
    from lowbit.train.bitnet_run import scratch_model, token_stream, train_model

    model, tok = scratch_model(None, args.seed)
    train_ids, eval_ids = token_stream(tok, "train"), token_stream(tok, "eval")
    s = settings(args, args.steps, args.minutes)
    model, summary, history = train_model(model, train_ids, eval_ids, s, bitnet=args.worker == "bitnet",
                                          packing=args.packing, progress=not args.quiet, measure_before=False)
    if args.save_to and args.worker == "bitnet":
        from lowbit.io.native import save

        save(model, args.save_to, tok)
        summary["saved"] = str(args.save_to)
    Path(args.result).write_text(json.dumps({"summary": summary, "history": history.to_json()}, indent=1))


def run_pair(args, steps: dict, minutes: float | None, tag: str, out: Path) -> dict:
    procs = {}
    for kind in ("float", "bitnet"):
        cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(steps[kind]), "--result",
               str(out / f"{tag}-{kind}.json"), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--warmup", str(args.warmup), "--seed", str(args.seed),
               "--eval-every", str(args.eval_every), "--packing", args.packing]
        cmd += ["--minutes", str(minutes)] if minutes else []
        cmd += ["--save-to", str(out / "bitnet-model")] if args.save and kind == "bitnet" and tag == "run" else []
        cmd += ["--quiet"] if tag != "run" else []
        procs[kind] = subprocess.Popen(cmd)
    for kind, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"the {kind} training failed")
    return {kind: json.loads((out / f"{tag}-{kind}.json").read_text()) for kind in procs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of each model (default 10)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--packing", default="trit5")
    p.add_argument("--calibration-steps", type=int, default=8)
    p.add_argument("--margin", type=float, default=0.8,
                   help="share of the calibrated step count scheduled (load on a shared machine varies; default 0.8)")
    p.add_argument("--out", default="bitnet-vs-float")
    p.add_argument("--save", action="store_true", help="save the BitNet model to OUT/bitnet-model")
    # internal: one worker
    p.add_argument("--worker", choices=["float", "bitnet"], help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save-to", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    calib = run_pair(args, {"float": args.calibration_steps, "bitnet": args.calibration_steps}, None, "calibration", out)
    per_step = {k: r["summary"]["minutes"] * 60 / r["summary"]["steps"] for k, r in calib.items()}
    steps = {k: max(1, int(args.minutes * 60 / v * args.margin)) for k, v in per_step.items()}
    print(f"seconds per step {per_step}; steps for {args.minutes} min: {steps}", file=sys.stderr)
    results = run_pair(args, steps, args.minutes, "run", out)
    report(results, out, args, time.time() - start)


def report(results: dict, out: Path, args, wall: float) -> None:
    from lowbit.train.loop import History, write_loss_curve

    curves = {}
    for kind, r in results.items():
        h = r["history"]
        curves[kind] = History(losses=[tuple(x) for x in h["losses"]], evals=[tuple(x) for x in h["evals"]])
    write_loss_curve(out / "loss.png", curves, title=f"bundled architecture from scratch, {args.minutes:g} min each")
    rows = ["| model | steps | tokens | minutes | tokens/s | held-out perplexity |", "|---|---|---|---|---|---|"]
    for kind, r in results.items():
        s = r["summary"]
        ppl = s.get("ppl_ternary", s["ppl_trained"])
        rows.append(f"| {kind} | {s['steps']} | {s['tokens']:,} | {s['minutes']} | {s['tokens_per_second']:,} | {ppl:.2f} |")
    b = results["bitnet"]["summary"]
    rows.append(f"\nBitNet fake-quantised model {b['ppl_trained']:.2f}, converted to ternary weights "
                f"{b['ppl_ternary']:.2f}; ternary Linears: {b['weight_bits']['bits_per_weight']:.4f} bits per weight "
                f"({b['weight_bits']['bytes']:,} bytes for {b['weight_bits']['weights']:,} weights). "
                f"Wall time {wall / 60:.1f} min.")
    text = "\n".join(rows)
    (out / "summary.json").write_text(json.dumps({k: r["summary"] for k, r in results.items()}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
