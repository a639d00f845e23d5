"""The GGUF keys and tensors that change a Llama's arithmetic beyond its sizes: rope scaling, on export
and on import (shared/formats.md). What llama.cpp's converter writes:

    linear scaling   llama.rope.scaling.type "linear", llama.rope.scaling.factor
    Llama 3 scaling  rope_freqs.weight f32 [head_dim / 2]: each frequency's divisor, from factor,
                     low/high_freq_factor and original_max_position_embeddings (no scaling keys)

Import honours these and refuses, in one line naming the key, every other key that changes what the
model computes (YaRN and other scalings, softcapping, sliding windows, logit/embedding/residual scales,
experts), so a file is never read as a model it is not.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from lowbit.errors import LowbitError

ROPE_FREQS = "rope_freqs.weight"
# keys whose presence (with a value other than the neutral one) changes the arithmetic; None: any value
UNHONOURED = {"attn_logit_softcapping": None, "final_logit_softcapping": None, "attention.sliding_window": None,
              "logit_scale": 1.0, "embedding_scale": 1.0, "residual_scale": 1.0, "attention.scale": None,
              "rope.scaling.attn_factor": 1.0, "rope.dimension_sections": None, "expert_count": 0,
              "rope.scaling.yarn_log_multiplier": None}
LLAMA3_GRID = {"low_freq_factor": (1.0, 2.0), "high_freq_factor": (4.0, 2.0, 8.0),
               "original_max_position_embeddings": (8192, 4096, 2048, 16384, 32768, 131072)}


def llama3_factors(theta: float, dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: int) -> np.ndarray:
    """rope_freqs as convert_hf_to_gguf.py computes it for rope_type "llama3"."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, out = original_max_position_embeddings, []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high_freq_factor:
            out.append(1.0)
        elif wavelen > old / low_freq_factor:
            out.append(factor)
        else:
            smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def rope_for_export(config, theta: float, dim: int) -> tuple[dict, dict]:
    """({llama.* key suffix: value}, {tensor name: f32 array}) describing the config's rope scaling."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}, {}
    if kind == "linear":
        return {"rope.scaling.type": "linear", "rope.scaling.factor": float(rope["factor"])}, {}
    if kind == "llama3":
        args = {k: rope.get(k, LLAMA3_GRID[k][0]) for k in LLAMA3_GRID}
        return {}, {ROPE_FREQS: llama3_factors(theta, dim, float(rope["factor"]), **args)}
    raise LowbitError(f"GGUF export writes plain, linear and Llama 3 rope scaling, not rope_type {kind!r}")


def _llama3_parameters(factors: np.ndarray, theta: float, dim: int) -> dict | None:
    """The Llama 3 scaling that gives exactly these rope_freqs, or None."""
    factor = float(factors.max())
    for values in itertools.product(*LLAMA3_GRID.values()):
        args = dict(zip(LLAMA3_GRID, values))
        if np.allclose(llama3_factors(theta, dim, factor, **args), factors, rtol=1e-6, atol=0):
            return {"rope_type": "llama3", "factor": factor, **args}
    return None


def rope_from_gguf(meta: dict, table: dict, theta: float, dim: int) -> dict:
    """transformers rope_parameters for a llama GGUF file; one-line refusal naming the key or tensor it
    cannot honour."""
    for suffix, neutral in UNHONOURED.items():
        key = f"llama.{suffix}"
        if key in meta and (neutral is None or meta[key] != neutral):
            raise LowbitError(f"GGUF key {key} = {str(meta[key])[:40]} changes the arithmetic and lowbit's import "
                              "does not honour it")
    kind = str(meta.get("llama.rope.scaling.type", "none"))
    params = {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        params.update(rope_type="linear", factor=float(meta.get("llama.rope.scaling.factor", 1.0)))
    elif kind != "none":
        raise LowbitError(f"GGUF key llama.rope.scaling.type = {kind} is not honoured by lowbit's import "
                          "(plain, linear and Llama 3 rope are)")
    if ROPE_FREQS in table:
        shape, ggml_type, data = table[ROPE_FREQS]
        factors = np.asarray(data, dtype=np.float32).reshape(-1)
        if ggml_type != "F32" or factors.size != dim // 2:
            raise LowbitError(f"GGUF tensor {ROPE_FREQS} of type {ggml_type} and shape {shape} does not fit "
                              f"head dim {dim}")
        if not np.all(factors == 1.0):
            llama3 = _llama3_parameters(factors, theta, dim) if kind == "none" else None
            if llama3 is None:
                raise LowbitError(f"GGUF tensor {ROPE_FREQS} holds frequency factors that are not Llama 3 rope "
                                  "scaling: lowbit's import does not honour them")
            params.update(llama3)
    return params
