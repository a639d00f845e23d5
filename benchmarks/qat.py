"""QAT against the best post-training method (GPTQ) at low bits on the bundled model: how much of GPTQ's
perplexity gap to full precision QAT recovers, and what the training cost.

    .venv/bin/python benchmarks/qat.py                                   # int3 g128 and int2 g64 (~25 min)
    .venv/bin/python benchmarks/qat.py --schemes int2-g64 --steps 300 --no-distill

Every row is scored by lowbit.eval.compare's protocol (the bundled eval text, the model's context,
the same held-out windows, fidelity against the same full-precision reference). GPTQ rows use lowbit's
default GPTQ settings and calibration (`lowbit quantize --method gptq-...`). QAT rows run `lowbit qat`'s code
(lowbit.train.qat_run.run_qat): learned step sizes (LSQ), distilled from the float model on the bundled
training text by default, then converted to real weights and reloaded from the saved folder before scoring.
"recovered" = (GPTQ - QAT) / (GPTQ - float) perplexity. Writes qat.md, qat.json and qat.png into --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="int3-g128,int2-g64")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-distill", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/qat"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from lowbit import api
    from lowbit.eval.compare import quantised_copy
    from lowbit.eval.evaluate import eval_windows, evaluate
    from lowbit.eval.fidelity import build_reference
    from lowbit.methods import parse_method
    from lowbit.train.loop import History, LoopSettings, write_loss_curve
    from lowbit.train.qat_run import QATJob, run_qat

    torch.set_num_threads(args.threads)
    base, tok = api.load_model(None)
    reference = build_reference(base, eval_windows(base, tok))
    fp = reference.perplexity.perplexity
    rows, curves = [{"scheme": "-", "method": "float (fp16 weights)", "perplexity": fp, "kl": 0.0}], {}
    loop = LoopSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=256, warmup=20,
                        eval_every=50, checkpoint_every=50, log_every=25)
    for scheme in args.schemes.split(","):
        print(f"gptq-{scheme}", file=sys.stderr, flush=True)
        model, seconds = quantised_copy(base, parse_method(f"gptq-{scheme}"), tok, {})
        gptq = evaluate(model, reference=reference, speed=False)
        del model
        gc.collect()
        rows.append({"scheme": scheme, "method": "GPTQ", "perplexity": gptq["perplexity"], "kl": gptq["kl"],
                     "bits_per_weight": gptq["bits_per_weight"], "minutes": seconds / 60})
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "qat"
            s = run_qat(QATJob(None, scheme, str(out), distill=not args.no_distill), loop)
            model, _ = api.load(out)
            qat = evaluate(model, reference=reference, speed=False)
        curves[f"qat-{scheme}"] = History([tuple(x) for x in s["losses"]], [tuple(x) for x in s["evals"]])
        recovered = (gptq["perplexity"] - qat["perplexity"]) / (gptq["perplexity"] - fp)
        rows.append({"scheme": scheme, "method": f"QAT ({s['steps']} steps x {args.batch_size} x 256, "
                     f"{'distilled' if not args.no_distill else 'next-token'})", "perplexity": qat["perplexity"],
                     "kl": qat["kl"], "bits_per_weight": qat["bits_per_weight"], "minutes": s["train_seconds"] / 60,
                     "tokens": s["tokens"], "recovered": recovered})
        print(render(rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qat.md").write_text(render(rows) + "\n")
    (args.out / "qat.json").write_text(json.dumps({"rows": rows, "args": vars(args) | {"out": str(args.out)}},
                                                  indent=1))
    write_loss_curve(args.out / "qat.png", curves, title="QAT on the bundled model",
                     eval_axis=None if args.no_distill else "held-out NLL (nats/token)")
    print(f"wrote {args.out}/qat.md, qat.json, qat.png")


def render(rows) -> str:
    lines = ["| scheme | method | bits/weight | perplexity | KL | recovered of GPTQ's gap | minutes |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "16"
        rec = f"{100 * r['recovered']:.0f}%" if "recovered" in r else ""
        minutes = f"{r['minutes']:.1f}" if "minutes" in r else ""
        lines.append(f"| {r['scheme']} | {r['method']} | {bpw} | {r['perplexity']:.3f} | {r['kl']:.4f} | {rec} | "
                     f"{minutes} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
