"""Prefill and decode throughput (tokens/s), batch 1: measurements for tables, never asserted in tests."""
from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_tokens: int
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    threads: int

    def protocol(self) -> str:
        return (f"batch 1, {self.threads} CPU threads, median of {self.repeats} runs after a warm-up: prefill = "
                f"one {self.prefill_tokens}-token forward pass; decode = {self.decode_tokens} greedy tokens "
                f"with the KV cache after a {self.prompt_tokens}-token prompt")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisation are not throughput
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cache_keyword(model) -> str:
    """transformers 5 names the KV cache argument `cache`; earlier versions `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _step(model, ids: torch.Tensor, cache, keyword: str):
    """One forward pass with the KV cache: (greedy next token [1, 1], updated cache)."""
    out = model(input_ids=ids, use_cache=True, **({} if cache is None else {keyword: cache}))
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits[:, -1:].argmax(-1), new_cache


@torch.inference_mode()
def _prefill(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=True)


@torch.inference_mode()
def _decode(model, prompt: torch.Tensor, n_tokens: int) -> float:
    """Seconds for n_tokens greedy steps with the KV cache, the prompt's own forward pass excluded."""
    keyword = cache_keyword(model)
    token, cache = _step(model, prompt, None, keyword)
    start = time.perf_counter()
    for _ in range(n_tokens):
        token, cache = _step(model, token, cache, keyword)
    return time.perf_counter() - start


def _tokens(ids: torch.Tensor, n: int) -> torch.Tensor:
    """The first n ids (repeated if there are fewer) as a batch of one."""
    ids = ids.reshape(-1)
    reps = -(-n // ids.numel())
    return ids.repeat(reps)[:n].unsqueeze(0)


def measure_speed(model, ids: torch.Tensor, prefill_tokens: int = 256, decode_tokens: int = 16,
                  prompt_tokens: int = 16, repeats: int = 3) -> SpeedResult:
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1 << 30
    prefill_tokens = min(prefill_tokens, max_pos)
    decode_tokens = max(1, min(decode_tokens, max_pos - prompt_tokens - 1))
    prefill_ids, prompt = _tokens(ids, prefill_tokens), _tokens(ids, prompt_tokens)
    prefill_s = _median_seconds(lambda: _prefill(model, prefill_ids), repeats)
    _decode(model, prompt, min(decode_tokens, 2))  # warm-up
    decode_s = statistics.median(_decode(model, prompt, decode_tokens) for _ in range(repeats))
    return SpeedResult(prefill_tokens / prefill_s, decode_tokens / decode_s, prefill_tokens, prompt_tokens,
                       decode_tokens, repeats, torch.get_num_threads())
