"""What a quantised KV cache costs: perplexity read through the cache, live memory, decode speed.

Perplexity here is scored the way generation sees the cache: each window is fed `step` tokens at a time
(1: token by token, as decoding does) with the cache carrying everything before, so every prediction
attends to the quantised past and only the newest tokens in full precision. With the fp cache this equals
a single forward pass over the window up to float rounding (tested), which makes the two comparable.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.perplexity import PerplexityResult
from lowbit.eval.scoring import Scores
from lowbit.eval.speed import cache_keyword
from lowbit.eval.windows import split_windows
from lowbit.weights.kv import KVSpec


def new_cache(model, spec: KVSpec | str | None):
    """A fresh cache for `model`: transformers' DynamicCache for spec None (the fp baseline), else lowbit's."""
    from transformers import DynamicCache

    from lowbit.nn.kv_cache import QuantizedKVCache

    if spec is None:
        return DynamicCache(config=model.config)
    return QuantizedKVCache(spec, config=model.config)


@torch.inference_mode()
def _window_nll(model, ids: torch.Tensor, spec, step: int) -> float:
    """Summed next-token NLL (nats) over windows ids [b, t], fed `step` tokens at a time through one cache."""
    cache = new_cache(model, spec)
    total = 0.0
    t = ids.shape[1]
    for start in range(0, t - 1, step):
        chunk = ids[:, start:min(start + step, t - 1)]
        logits = model(input_ids=chunk, use_cache=True, **{cache_keyword(model): cache}).logits.float()
        targets = ids[:, start + 1:start + 1 + chunk.shape[1]]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   reduction="sum").item()
    return total


def kv_perplexity(model, ids, spec: KVSpec | str | None, context: int, step: int = 1, batch_size: int = 8,
                  max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    """Held-out perplexity with the KV cache `spec` (None: full precision), windows of `context` tokens."""
    if not isinstance(step, int) or step < 1:
        raise LowbitError(f"step must be a positive integer number of tokens, got {step!r}")
    windows = split_windows(ids, context)
    if max_windows is not None:
        windows = windows.head(max_windows)
    scores = Scores()
    batches = range(0, windows.n_windows, batch_size)
    name = "fp" if spec is None else (spec if isinstance(spec, str) else spec.name)
    for b in tqdm(batches, desc=f"perplexity, {name} KV cache", unit="batch", disable=not progress):
        batch = windows.ids[b:b + batch_size]
        scores.nll_sum += _window_nll(model, batch, spec, step)
        scores.n_scored += batch.shape[0] * (batch.shape[1] - 1)
    result = PerplexityResult.from_scores(scores, windows)
    feed = "token by token" if step == 1 else f"{step} tokens at a time"
    return PerplexityResult(result.perplexity, result.nll, result.n_scored, result.context, result.n_windows,
                            f"{result.protocol}; fed {feed} through the {name} KV cache")


@torch.inference_mode()
def fill_cache(model, spec, n_tokens: int, chunk: int = 512, seed: int = 0):
    """A cache holding n_tokens (random ids, batch 1), filled by the model `chunk` tokens at a time."""
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise LowbitError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=g)
    cache = new_cache(model, spec)
    for start in range(0, n_tokens, chunk):
        model(input_ids=ids[:, start:start + chunk], use_cache=True, **{cache_keyword(model): cache})
    return cache


@dataclass(frozen=True)
class KVSpeed:
    decode_tokens_per_s: float
    context: int
    decode_tokens: int


@torch.inference_mode()
def kv_decode_speed(model, spec, context: int, decode_tokens: int = 32, seed: int = 0) -> KVSpeed:
    """Greedy decode tokens/s, batch 1, after a `context`-token prompt, with the given cache (prompt excluded)."""
    cache = fill_cache(model, spec, context, seed=seed)
    token = torch.zeros(1, 1, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        logits = model(input_ids=token, use_cache=True, **{cache_keyword(model): cache}).logits
        token = logits[:, -1:].argmax(-1)
    seconds = time.perf_counter() - start
    return KVSpeed(decode_tokens / seconds if seconds > 0 else math.inf, context, decode_tokens)


FP_ROW = "fp16"   # the baseline row: transformers' own cache, in the model's precision


def parse_kv_schemes(text: str) -> list[KVSpec | None]:
    """"fp16,int8,int4-g32,fp8" -> [None, KVSpec, ...]; None is the full-precision baseline."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise LowbitError("give at least one KV-cache scheme, e.g. --schemes fp16,int8,int4")
    return [None if n in (FP_ROW, "fp", "fp32", "bf16") else KVSpec.parse(n) for n in names]


def _head_shape(model) -> tuple[int, int, int]:
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim


def check_memory_tokens(model, memory_tokens) -> None:
    """Filling a cache past the model's positions works only with rotary positions (they extrapolate);
    a learned position table has no row there: refused before any work."""
    c = model.config.get_text_config(decoder=True)
    limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    rotary = any(hasattr(c, k) for k in ("rope_theta", "rope_parameters", "rope_scaling"))
    longest = max(memory_tokens)
    if limit and longest > limit and not rotary:
        raise LowbitError(f"this model has learned positions for {limit} tokens; measure the cache at "
                          f"--memory-tokens {limit} or fewer (asked {longest})")


def live_kv_bytes(model_fp16, spec, n_tokens: int) -> tuple[int, float]:
    """(bytes the cache holds after n_tokens, the calculator's figure) on a model computing in fp16."""
    from lowbit.calc import kv_cache_memory, quantized_kv_cache_memory
    from lowbit.nn.kv_cache import cache_nbytes

    live = cache_nbytes(fill_cache(model_fp16, spec, n_tokens))
    args = (*_head_shape(model_fp16), n_tokens)
    calc = kv_cache_memory(*args).bytes if spec is None else quantized_kv_cache_memory(*args, 1, spec).bytes
    return live, calc


def kv_report(model, ids, schemes, context: int, memory_tokens=(4096, 32768), step: int = 1,
              speed: bool = True, progress: bool = True) -> list[dict]:
    """One row per scheme: perplexity through the cache (and its change against the first row), live KV
    bytes at each of memory_tokens with the calculator's figure (on an fp16 copy of the model, made once
    after every perplexity: the model scored is never rounded), decode tokens/s after a `context` prompt."""
    import copy

    check_memory_tokens(model, memory_tokens)
    rows = []
    for spec in schemes:
        ppl = kv_perplexity(model, ids, spec, context, step=step, progress=progress)
        rows.append({"kv_cache": FP_ROW if spec is None else spec.name, "perplexity": ppl.perplexity,
                     "protocol": ppl.protocol})
        if speed:
            rows[-1]["decode_tokens_per_s"] = kv_decode_speed(model, spec, context).decode_tokens_per_s
    half = copy.deepcopy(model).to(torch.float16)
    for row, spec in zip(rows, schemes):
        for n in memory_tokens:
            row[f"bytes_{n}"], row[f"calc_bytes_{n}"] = live_kv_bytes(half, spec, n)
    del half
    base = rows[0]
    for row in rows:
        row["ppl_change"] = row["perplexity"] / base["perplexity"] - 1
        for n in memory_tokens:
            row[f"ratio_{n}"] = base[f"bytes_{n}"] / row[f"bytes_{n}"]
    return rows


def render_kv_report(rows: list[dict], memory_tokens=(4096, 32768), markdown: bool = False) -> str:
    from lowbit.table import format_table

    headers = ["KV cache", "perplexity", "change"]
    for n in memory_tokens:
        headers += [f"MiB @{n}", f"calc MiB @{n}", f"x smaller @{n}"]
    speed = "decode_tokens_per_s" in rows[0]
    headers += ["decode tok/s"] if speed else []
    body = []
    for r in rows:
        line = [r["kv_cache"], r["perplexity"], f"{100 * r['ppl_change']:+.2f}%"]
        for n in memory_tokens:
            line += [r[f"bytes_{n}"] / 2**20, r[f"calc_bytes_{n}"] / 2**20, r[f"ratio_{n}"]]
        body.append(line + ([r["decode_tokens_per_s"]] if speed else []))
    notes = [f"perplexity: {rows[0]['protocol']}; every row scores the same windows through its own cache",
             "memory: bytes the live cache holds (fp16 model states; batch 1; random tokens), beside "
             "lowbit.calc's figure; quantised rows include scales, zero points and the fp16 window"]
    return format_table(headers, body, markdown) + "\n\n" + "\n".join(notes)
