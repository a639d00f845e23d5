"""GPTQ layer by layer on real weights: lowbit against llm-compressor on the same W and the same H.

    .venv/bin/python benchmarks/real_weights_layers.py                  # int4 g128, 512 calibration sentences
    .venv/bin/python benchmarks/real_weights_layers.py --bits 3 --json out/layers3.json

One llm-compressor GPTQ run (W{bits}A16, its defaults) on all-MiniLM-L6-v2 records, for every Linear, the
weight and the Hessian it hands its GPTQ (benchmarks/real_weights_peers.py, in benchmarks/.venv-peers),
and the weight it chose. One lowbit pipeline run records its own Hessian for the same Linear (same
sentences, each its own sample). Then per Linear:

    H agreement    ||H_lowbit / tr - H_peer / tr||_F / ||H_peer / tr||_F (the scale of H does not matter to
                   GPTQ; what differs is which tokens and which upstream weights produced the inputs)
    output error   sqrt(tr((W - Q) H (W - Q)^T) / tr(W H W^T)) under the peer's H, for the peer's Q, RTN
                   on the same grid, and lowbit's GPTQ configurations computed on that same H and W.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_weights as rw  # noqa: E402  (the benchmark next to this file)

CONFIGS = ("gptq-int{b}-g128", "gptq-int{b}-g128-noclip", "gptq-int{b}-g128-mse", "gptq-int{b}-g128-damp0.001",
           "gptq-int{b}-g128-noactorder-dynamic-noclip")


def rel_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d, w, h = (w - q).double(), w.double(), h.double()
    return float((((d @ h) * d).sum() / ((w @ h) * w).sum()).clamp(min=0).sqrt())


def lowbit_hessians(base, tok, calibration, bits: int) -> dict[str, torch.Tensor]:
    """The Hessian lowbit's pipeline hands each Linear (true sequential, samples mode)."""
    import lowbit
    from lowbit.methods.gptq import GPTQ

    seen = {}

    @dataclasses.dataclass(frozen=True)
    class Recording(GPTQ):
        tag: str = ""

        def for_layer(self, layer):
            return dataclasses.replace(super().for_layer(layer), tag=layer.name)

        def quantize_weight(self, weight, stats=None):
            seen[self.tag] = stats.hessian()
            return super().quantize_weight(weight, stats)

    lowbit.quantize(copy.deepcopy(base), Recording(bits=bits), calibration=calibration, tokenizer=tok,
                    n_samples=len(calibration), seq_len=rw.MAX_LENGTH, progress=False, calibration_mode="samples")
    return seen


def peer_capture(calibration, bits: int, threads: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "peer"
    run = {"name": name, "kind": "llmcompressor", "bits": bits, "capture": True}
    with tempfile.TemporaryDirectory() as tmp:
        job, out = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.safetensors")
        Path(job).write_text(json.dumps({"model": str(rw.model_folder()), "calibration": calibration, "eval": [],
                                         "runs": [run], "threads": threads, "max_length": rw.MAX_LENGTH}))
        env = dict(os.environ, PYTHONWARNINGS="ignore", LOGURU_LEVEL="WARNING", HF_HUB_OFFLINE="1")
        subprocess.run([str(rw.PEER_PY), str(rw.HERE / "real_weights_peers.py"), job, out], check=True, env=env)
        got = load_file(out)
    return {k[len(name) + 1:]: v for k, v in got.items() if k.startswith(name + ".") and k != name + ".seconds"}


def compare_layers(peer: dict, ours: dict, bits: int) -> list[dict]:
    from lowbit.methods import parse_method
    from lowbit.methods.gptq import gptq_quantize, round_to_nearest

    configs = {c.format(b=bits): parse_method(c.format(b=bits)) for c in CONFIGS}
    rows = []
    for name in [k[:-2] for k in peer if k.endswith(".h")]:
        h, w, q_peer = peer[name + ".h"], peer[name + ".w"], peer[name + ".q"]
        row = {"layer": name, "peer": rel_error(w, q_peer, h),
               "rtn": rel_error(w, round_to_nearest(w, configs[f"gptq-int{bits}-g128"]).dequantize(), h)}
        if name in ours:
            a, b = ours[name].double(), h.double()
            row["h_diff"] = float((a / a.trace() - b / b.trace()).norm() / (b / b.trace()).norm())
        for label, cfg in configs.items():
            row[label] = rel_error(w, gptq_quantize(w, h, cfg).dequantize(), h)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import lowbit

    rw.ensure_peer_venv()
    base, tok = lowbit.load_model(rw.model_folder())
    calibration, _ = rw.sentences(args.calibration_samples, 0)
    peer = peer_capture(calibration, args.bits, args.threads)
    ours = lowbit_hessians(base, tok, calibration, args.bits)
    rows = compare_layers(peer, ours, args.bits)
    keys = ["h_diff", "rtn", "peer"] + [c.format(b=args.bits) for c in CONFIGS]
    print("| layer | " + " | ".join(keys) + " |\n|---" * (len(keys) + 1) + "|")
    for r in rows:
        print(f"| {r['layer']} | " + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in keys) + " |")
    means = {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}
    print("| mean | " + " | ".join(f"{means[k]:.4f}" for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
