"""Wall time of `lowbit quantize` in one process against `torchrun --nproc-per-node N -m lowbit quantize`, with
the output folders compared byte for byte.

    .venv/bin/python benchmarks/distributed.py                        # 768x4, rtn, gptq and awq, 1 vs 2 processes
    .venv/bin/python benchmarks/distributed.py --sizes 1024x4 --methods gptq-int4-g128 --samples 64

The model is benchmarks/streaming.py's synthetic Llama (fp32 random weights, vocabulary 8192) with the bundled
model's tokenizer. Three runs per row, each a fresh command as a user would type it: one process with one
thread (the baseline the shared runs must equal byte for byte), one process with N threads (what the same cores
give without torchrun), and torchrun with N processes of one thread each. Times include starting Python and
loading the model in every process.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming import write_llama  # noqa: E402  (the same synthetic model)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "lowbit-tiny-llama"


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - start


def same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False)
                                                                  for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["768x4"], help="model sizes as HIDDENxBLOCKS")
    ap.add_argument("--methods", nargs="+", default=["rtn-int4-g128", "gptq-int4-g128", "awq-int4-g128"])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    n = args.processes
    torchrun = Path(sys.executable).with_name("torchrun")
    print(f"| hidden x blocks | method | 1 process, 1 thread s | 1 process, {n} threads s | torchrun {n} x 1 thread s "
          f"| speed-up vs 1 thread | vs {n} threads | bytes equal |")
    print("|---" * 8 + "|")
    root = Path(tempfile.mkdtemp())
    try:
        for shape in args.sizes:
            hidden, layers = map(int, shape.split("x"))
            folder = root / f"llama-{shape}"
            write_llama(folder, layers, hidden, int(hidden * 2.75) // 256 * 256)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(TOKENIZER / name, folder / name)
            for method in args.methods:
                common = ["quantize", str(folder), "--method", method, "--samples", str(args.samples), "--seq-len",
                          str(args.seq_len), "--quiet"]
                out = {k: root / f"{shape}-{method}-{k}" for k in ("one", "threads", "shared")}
                one = timed([sys.executable, "-m", "lowbit", *common, "--threads", "1", "-o", str(out["one"])], 1)
                threads = timed([sys.executable, "-m", "lowbit", *common, "--threads", str(n), "-o",
                                 str(out["threads"])], n)
                shared = timed([str(torchrun), "--standalone", "--nproc-per-node", str(n), "-m", "lowbit", *common,
                                "--threads", "1", "-o", str(out["shared"])], 1)
                print(f"| {shape} | {method} | {one:.1f} | {threads:.1f} | {shared:.1f} | {one / shared:.2f} | "
                      f"{threads / shared:.2f} | {'yes' if same(out['one'], out['shared']) else 'NO'} |", flush=True)
                for p in out.values():
                    shutil.rmtree(p)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
