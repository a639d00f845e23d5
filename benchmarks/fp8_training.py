"""FP8 training against BF16: the bundled model's architecture trained from scratch, same seed, same data order,
same schedule, once with the decoder Linears in FP8 (E4M3 forward, E5M2 backward, delayed scaling) and once
in BF16 (autocast), both with float32 master weights and AdamW state. Reports the final held-out loss of each,
their difference in %, steps / tokens / minutes, one PNG with both loss curves, and the speed of
torch._scaled_mm against lowbit's float32 emulation of the same FP8 GEMM on this machine.

    .venv/bin/python benchmarks/fp8_training.py --out out/fp8                 # 250 steps each, both at once
    .venv/bin/python benchmarks/fp8_training.py --out out/fp8 --jobs 1        # one after the other
    .venv/bin/python benchmarks/fp8_training.py --out out/fp8 --steps 50      # a quick look

Each run checkpoints under OUT/<precision>.checkpoints, so running the same command again after an
interruption resumes; a finished run's OUT/<precision>.json is reused.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from lowbit.train.loop import History, LoopSettings, write_loss_curve  # noqa: E402

PRECISIONS = ("fp8", "bf16")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--history-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, choices=[1, 2], default=2, help="runs at once, one torch thread each")
    p.add_argument("--only", choices=PRECISIONS, help="(internal) run one precision in this process")
    p.add_argument("--skip-scaled-mm", action="store_true", help="do not time torch._scaled_mm")
    return p.parse_args()


def settings_of(args) -> LoopSettings:
    return LoopSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                        warmup=args.warmup, min_lr_ratio=0.1, weight_decay=0.1, max_grad_norm=1.0, seed=args.seed,
                        eval_every=args.eval_every, checkpoint_every=25, log_every=10, threads=1)


def run_one(precision: str, args) -> dict:
    from lowbit.train.fp8_run import train_precision
    from lowbit.train.fp8_scaling import DelayedScaling

    _, _, history, summary = train_precision(precision, settings_of(args), DelayedScaling(amax_history_len=args.history_len),
                                             scratch=True, checkpoint_dir=args.out / f"{precision}.checkpoints")
    summary["history"] = history.to_json()
    (args.out / f"{precision}.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_all(args) -> dict:
    todo = [p for p in PRECISIONS if not (args.out / f"{p}.json").is_file()]
    if args.jobs == 2 and len(todo) == 2:
        base = [sys.executable, __file__, *sys.argv[1:]]
        procs = [subprocess.Popen([*base, "--only", p]) for p in todo]
        if any(proc.wait() for proc in procs):
            raise SystemExit("a training run failed")
    else:
        for p in todo:
            run_one(p, args)
    return {p: json.loads((args.out / f"{p}.json").read_text()) for p in PRECISIONS}


def time_gemm(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def scaled_mm_ratio(tokens: int = 256, k: int = 256, n: int = 256) -> dict:
    """One forward GEMM of an FP8 Linear [tokens, k] x [k, n]: torch._scaled_mm vs the float32 emulation."""
    from lowbit.train.fp8_linear import fp8_mm

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(tokens, k, generator=g) * 30).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, generator=g) * 30).to(torch.float8_e4m3fn).t()
    one = torch.ones(())
    try:
        scaled = time_gemm(lambda: fp8_mm(a, one, b, one, "scaled_mm"))
    except (RuntimeError, NotImplementedError) as e:
        return {"runs": False, "error": str(e).splitlines()[0]}
    emulated = time_gemm(lambda: fp8_mm(a, one, b, one, "emulated"))
    same = torch.equal(fp8_mm(a, one, b, one, "scaled_mm"), fp8_mm(a, one, b, one, "emulated"))
    return {"runs": True, "shape": [tokens, k, n], "scaled_mm_s": scaled, "emulated_s": emulated,
            "scaled_mm_over_emulated": scaled / emulated, "bit_identical": same}


def history_of(summary: dict) -> History:
    h = summary["history"]
    return History([tuple(x) for x in h["losses"]], [tuple(x) for x in h["evals"]], h["seconds"], h["tokens"])


def report(results: dict, gemm: dict | None, args) -> tuple[str, float]:
    fp8, bf16 = results["fp8"], results["bf16"]
    diff = 100 * (fp8["final_eval_loss"] - bf16["final_eval_loss"]) / bf16["final_eval_loss"]
    rows = [f"{'run':6s} {'steps':>5s} {'tokens':>9s} {'minutes':>7s} {'held-out loss':>13s} {'ppl':>7s}"]
    for name, s in results.items():
        rows.append(f"{name:6s} {s['steps']:5d} {s['tokens']:9,d} {s['train_seconds'] / 60:7.1f} "
                    f"{s['final_eval_loss']:13.4f} {s['final_eval_perplexity']:7.2f}")
    rows.append(f"FP8 vs BF16 held-out loss: {diff:+.2f}% (goal: within 2%)")
    rows.append(f"FP8 model's float32 master weights evaluated without FP8 casts: "
                f"{fp8['final_eval_loss_master_fp32']:.4f}")
    if gemm:
        rows.append("torch._scaled_mm on this CPU: " + (
            f"runs, {gemm['scaled_mm_over_emulated']:.0f}x the time of the float32 emulation "
            f"({gemm['shape'][0]}x{gemm['shape'][1]} @ {gemm['shape'][1]}x{gemm['shape'][2]}, 1 thread), "
            f"bit-identical: {gemm['bit_identical']}" if gemm["runs"] else f"does not run ({gemm['error']})"))
    return "\n".join(rows), diff


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only:
        torch.set_num_threads(1)
        run_one(args.only, args)
        return
    results = run_all(args)
    gemm = None if args.skip_scaled_mm else scaled_mm_ratio()
    text, diff = report(results, gemm, args)
    png = args.out / "fp8_vs_bf16.png"
    png.unlink(missing_ok=True)
    write_loss_curve(png, {"FP8": history_of(results["fp8"]), "BF16": history_of(results["bf16"])},
                     title="bundled Llama from scratch: FP8 vs BF16", eval_label="held-out loss")
    (args.out / "results.json").write_text(json.dumps({"fp8_vs_bf16_percent": diff, "scaled_mm": gemm,
                                                       "command": " ".join(sys.argv)}, indent=1))
    print(text)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
