"""The 0.38B benchmark model, its GGUF files and llama.cpp (llama-cpp-python), shared by decode.py and
quantize_time.py.

A random-initialised Llama (hidden 2048, intermediate 5632, 8 layers, 16 heads, 4 KV heads, the bundled
model's tokenizer and vocabulary of 4096): 0.38B parameters, 1.5 GB in float32, large enough that decoding
streams its weights from memory. Weights are rounded to fp16 once, so that the F16 GGUF file holds them
exactly and every row of a benchmark (lowbit and llama.cpp) starts from the same numbers.

llama.cpp is loaded with `use_extra_bufts = False`: on this project's AMX machines its AMX repacking of
Q4_0/Q8_0 weights crashes (see tests/llamacpp.py), so llama.cpp runs its ordinary CPU kernels here.
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import torch

CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 16,
          "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def build(seed: int = 0):
    """(model float32 with fp16-representable weights, the bundled tokenizer)."""
    import transformers

    from lowbit.api import load_model

    _, tok = load_model(None)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), **CONFIG)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model, tok


def llama_cpp():
    """llama_cpp with its model loader patched to leave the extra (AMX) buffer types off: the tests' own
    module (tests/llamacpp.py), which says why. ImportError when llama-cpp-python is not installed."""
    import importlib.util
    import sys

    if importlib.util.find_spec("llama_cpp") is None:
        raise ImportError("llama-cpp-python is not installed (make test-interop installs it)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.llamacpp import llama_cpp as lc

    return lc


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int) -> float:
    """llama.cpp's quantiser (llama-quantize) on a GGUF file; returns its wall seconds."""
    from lowbit.methods.ggml_mix import FILE_TYPES

    lc = llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[ftype.lower()].file_type
    params.nthread = threads
    start = time.perf_counter()
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}")
    return time.perf_counter() - start


def gguf_files(model, tok, folder: Path, types=("F16", "Q4_0", "Q4_K_M"), threads: int = 2) -> dict[str, Path]:
    """F16 written by lowbit (exact: the weights are fp16-representable), the others by llama-quantize from
    it; kept in `folder` and reused when present (same seed, same file)."""
    from lowbit.io.gguf import export_gguf

    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / "model-F16.gguf"
    if not f16.exists():
        export_gguf(model, f16, tokenizer=tok, type="F16")
    out = {"F16": f16}
    for t in types:
        if t != "F16":
            out[t] = folder / f"model-{t}.gguf"
            if not out[t].exists():
                llama_quantize(f16, out[t], t, threads)
    return out


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the tensors a decoding step reads: every weight but the token embedding (one row)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if t.name != "token_embd.weight")


def model_weight_bytes(model) -> int:
    """The same for a torch model: every module's weights, buffers included, but the input embedding."""
    embed = model.get_input_embeddings()
    skip = {id(p) for p in embed.parameters()}
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in tensors.values())
