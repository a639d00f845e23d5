"""`lowbit plan` on a Llama 3.1 405B-shaped folder whose shards are sparse files: real safetensors headers (the
planner reads nothing else), no weights, no disk used.

    .venv/bin/python benchmarks/plan_405b.py                     # gptq-int4-g128, 128 x 2048 calibration
    .venv/bin/python benchmarks/plan_405b.py --method rtn-int4-g128 --samples 0

Prints the plan (peak memory with and without --stream, disk, verdict on this machine). The time probe is
left out: it would run the method on the real 16384 x 53248 shapes, a Hessian of 53248^2 floats (11 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
          "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
          "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def shapes(c: dict) -> dict[str, list]:
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // \
        c["num_attention_heads"]
    out = {"model.embed_tokens.weight": [c["vocab_size"], h], "model.norm.weight": [h], "lm_head.weight":
           [c["vocab_size"], h]}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h], p + "mlp.down_proj.weight": [h, i],
                p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]}
    return out


def sparse_shard(path: Path, tensors: dict[str, list]) -> None:
    """A safetensors file with a true header and a hole where the bf16 data would be."""
    header, offset = {}, 0
    for name, shape in sorted(tensors.items()):
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="gptq-int4-g128")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        all_shapes = shapes(CONFIG)
        for n in range(CONFIG["num_hidden_layers"] + 1):
            prefix = f"model.layers.{n}." if n < CONFIG["num_hidden_layers"] else None
            part = {k: v for k, v in all_shapes.items()
                    if (k.startswith(prefix) if prefix else not k.startswith("model.layers."))}
            sparse_shard(folder / f"model-{n:05d}.safetensors", part)
        sizes = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)] if args.samples else []
        for extra in ([], ["--json"]):
            subprocess.run([sys.executable, "-m", "lowbit", "plan", str(folder), "--method", args.method, "--no-probe",
                            *sizes, *extra], env={**os.environ, "PYTHONPATH": str(SRC)}, check=True)


if __name__ == "__main__":
    main()
