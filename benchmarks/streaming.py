"""Peak resident memory of `lowbit quantize --stream` on a synthetic Llama larger than the memory it is given,
and `lowbit plan`'s prediction of that peak on three model sizes.

    .venv/bin/python benchmarks/streaming.py                              # 3 sizes, rtn and gptq, the largest 2.3 GB
    .venv/bin/python benchmarks/streaming.py --sizes 512x4 768x4 1024x4 --methods gptq-int4-g128
    .venv/bin/python benchmarks/streaming.py --in-memory                  # also the in-memory run, as the baseline

The model (--sizes hidden x blocks, MLP 2.75 x hidden, vocabulary 8192, fp32 random weights, one shard per block
plus an index, written straight to disk a block at a time so this script never holds it) is quantised in a
child process, whose peak resident set (its VmHWM, file pages it maps included) is compared with
--limit-gb and with what `lowbit plan` predicted for the same run from the config and shard headers. The
in-memory run (load_model, quantize, save) is measured the same way as the baseline. The limit is a measured
peak, not an enforced one: an address-space limit (prlimit --as) would refuse torch's large virtual reservations.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
GB = 1e9


def write_llama(folder: Path, layers: int, hidden: int = 1024, inter: int = 2816, vocab: int = 8192) -> int:
    """A random Llama folder, one fp32 shard per block (and one for the rest) with an index; returns its bytes."""
    import transformers as t
    from safetensors.torch import save_file

    config = t.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                           max_position_embeddings=2048, torch_dtype="float32")
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj":
              (hidden, hidden), "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden),
              "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    index, total = {}, 0
    names = [f"model-{i:05d}-of-{layers + 1:05d}.safetensors" for i in range(layers + 1)]
    for i in range(layers + 1):
        if i < layers:
            p = f"model.layers.{i}."
            tensors = {f"{p}{n}.weight": torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
            tensors |= {f"{p}input_layernorm.weight": torch.ones(hidden), f"{p}post_attention_layernorm.weight":
                        torch.ones(hidden)}
        else:
            tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
                       "model.norm.weight": torch.ones(hidden),
                       "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02}
        save_file(tensors, str(folder / names[i]), metadata={"format": "pt"})
        index |= {k: names[i] for k in tensors}
        total += sum(v.numel() * 4 for v in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}))
    return total


def child(folder: str, method: str, out: str, samples: int, seq_len: int, stream: bool) -> None:
    """Quantise in this process (what the parent measures)."""
    torch.set_num_threads(2)
    from lowbit import api

    ids = torch.randint(0, 8192, (samples, seq_len), generator=torch.Generator().manual_seed(0)) if samples else None
    if stream:
        api.quantize_folder(folder, method, out, calibration=ids, progress=False)
    else:
        model, _ = api.load_model(folder)
        api.quantize(model, method, calibration=ids, progress=False)
        api.save(model, out)
    status = Path("/proc/self/status").read_text()
    print(json.dumps({"peak": int(status.split("VmHWM:")[1].split()[0]) * 1024}))




def measured(folder: Path, method: str, samples: int, seq_len: int, stream: bool) -> tuple[float, float]:
    """(peak resident bytes of a child that quantises, its wall seconds). The child reports its own VmHWM:
    ru_maxrss from wait4 would count the parent's resident set at the fork, which exec does not reset."""
    out = Path(tempfile.mkdtemp(dir=folder.parent)) / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(folder), method, str(out), str(samples),
                           str(seq_len), "stream" if stream else "memory"], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the child failed ({done.returncode}): {done.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    subprocess.run(["rm", "-rf", str(out.parent)], check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"], seconds


def predicted(folder: Path, method: str, samples: int, seq_len: int) -> dict:
    """`lowbit plan --json` for the same run, in a fresh process as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "lowbit", "plan", str(folder), "--method", method, "--no-probe", "--json"]
    cmd += ["--samples", str(samples), "--seq-len", str(seq_len)] if samples else []   # else: no calibration
    return json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["768x8", "1024x16", "1024x44"],
                    help="model sizes as HIDDENxBLOCKS (MLP width 2.75 x hidden)")
    ap.add_argument("--methods", nargs="+", default=["rtn-int4-g128", "gptq-int4-g128"])
    ap.add_argument("--limit-gb", type=float, default=0.75, help="the memory the runs are given (a measured peak, not enforced)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--in-memory", action="store_true", help="also measure the in-memory run (needs the model's RAM)")
    ap.add_argument("--dir", help="where the synthetic models go (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    print("| hidden x blocks | fp32 weights GB | method | plan peak GB | measured peak GB | plan/measured | peak / limit "
          "| peak / weights | seconds |" + (" in-memory peak GB | streamed/in-memory |" if args.in_memory else ""))
    print("|---" * (11 if args.in_memory else 9) + "|")
    for shape in args.sizes:
        hidden, layers = map(int, shape.split("x"))
        folder = root / f"llama-{shape}"
        size = write_llama(folder, layers, hidden, int(hidden * 2.75) // 256 * 256)
        for method in args.methods:
            samples = args.samples if method.startswith(("gptq", "awq")) else 0
            plan = predicted(folder, method, samples, args.seq_len)
            peak, seconds = measured(folder, method, samples, args.seq_len, stream=True)
            row = (f"| {shape} | {size / GB:.2f} | {method} | {plan['peak_bytes'] / GB:.3f} | {peak / GB:.3f} | "
                   f"{plan['peak_bytes'] / peak:.2f} | {peak / (args.limit_gb * GB):.2f} | {peak / size:.2f} | "
                   f"{seconds:.0f} |")
            if args.in_memory:
                full, _ = measured(folder, method, samples, args.seq_len, stream=False)
                row += f" {full / GB:.3f} | {peak / full:.2f} |"
            print(row, flush=True)
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    os.rmdir(root)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        f, m, o, n, length, mode = sys.argv[2:8]
        child(f, m, o, int(n), int(length), mode == "stream")
    else:
        main()
