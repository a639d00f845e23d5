"""A quantised KV cache that transformers models use as they use their own (`generate`, forward passes).

    cache = QuantizedKVCache("int4", config=model.config)        # or KVSpec("int8", 64, 128)
    model.generate(ids, cache=cache, max_new_tokens=64)
    cache.nbytes                                                 # bytes the cache holds now

Each layer keeps the newest tokens in the model's precision and quantises them in chunks of
`spec.residual` tokens as they age (KIVI's layout: keys per channel, values per token; weights/kv.py).
Attention reads the dequantised past: the one layer being computed holds a transient full-precision
copy, as transformers' own quantised caches do; the stored cache is the quantised chunks plus the window.

Not imported by `lowbit.nn` (it loads transformers). Sliding-window and linear-attention layers are
refused: their caches drop or fold tokens, which the chunk store does not model.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.errors import LowbitError
from lowbit.weights.kv import KVSpec, quantize_chunk


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: quantised chunks of `spec.residual` tokens plus a full-precision window
    of fewer than `spec.residual` tokens (tokens 0..n_quantized-1 quantised, the rest in `keys`/`values`)."""

    is_croppable = False

    def __init__(self, spec: KVSpec):
        super().__init__()
        self.spec = spec
        self.key_chunks, self.value_chunks = [], []
        self.n_quantized = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new states; return the layer's whole keys and values [b, heads, tokens, head_dim]: the
        quantised past dequantised, then the window and the new states as they came."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k = [c.dequantize() for c in self.key_chunks]
        past_v = [c.dequantize() for c in self.value_chunks]
        window_k = torch.cat([self.keys, key_states], dim=-2)
        window_v = torch.cat([self.values, value_states], dim=-2)
        keys, values = torch.cat([*past_k, window_k], dim=-2), torch.cat([*past_v, window_v], dim=-2)
        self.keys, self.values = self._flush(window_k, window_v)
        return keys, values

    def _flush(self, window_k: torch.Tensor, window_v: torch.Tensor):
        """Quantise every whole chunk of `residual` tokens in the window; keep the rest (a copy, so the
        window does not pin the full tensor it was sliced from)."""
        r = self.spec.residual
        n_full = window_k.shape[-2] // r * r
        for start in range(0, n_full, r):
            self.key_chunks.append(quantize_chunk(window_k[..., start:start + r, :], self.spec, per_channel=True))
            self.value_chunks.append(quantize_chunk(window_v[..., start:start + r, :], self.spec, per_channel=False))
        self.n_quantized += n_full
        if not n_full:
            return window_k, window_v
        return window_k[..., n_full:, :].clone(), window_v[..., n_full:, :].clone()

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_quantized + self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.key_chunks, self.value_chunks = [], []
        self.n_quantized = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now: packed codes, scales and zero points of every chunk, plus the window."""
        if not self.is_initialized:
            return 0
        window = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return window + sum(c.nbytes for c in (*self.key_chunks, *self.value_chunks))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise LowbitError("the quantised KV cache does not support beam search (reordering would re-round "
                          "quantised tokens); use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise LowbitError("the quantised KV cache cannot be cropped (its old tokens are quantised in chunks)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise LowbitError("the quantised KV cache does not support expanding the batch after prefill")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise LowbitError("the quantised KV cache does not support selecting batch rows after prefill")


class QuantizedKVCache(Cache):
    """A transformers Cache of QuantizedKVLayer, one per decoder layer of `config` (or `num_layers`)."""

    def __init__(self, spec: KVSpec | str, config=None, num_layers: int | None = None):
        spec = KVSpec.parse(spec) if isinstance(spec, str) else spec
        if not isinstance(spec, KVSpec):
            raise LowbitError(f"a KV-cache scheme is a KVSpec or a name such as 'int4', got {type(spec).__name__}")
        if (config is None) == (num_layers is None):
            raise LowbitError("give the model's config or num_layers, one of them")
        if config is not None:
            num_layers = _full_attention_layers(config)
        self.spec = spec
        super().__init__(layers=[QuantizedKVLayer(spec) for _ in range(num_layers)])

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def _full_attention_layers(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if types - {"full_attention"}:
        raise LowbitError(f"the quantised KV cache holds full-attention layers only; this model also has "
                          f"{', '.join(sorted(types - {'full_attention'}))}")
    return text.num_hidden_layers


def cache_nbytes(cache) -> int:
    """Bytes a transformers cache holds now: a quantised cache's own count, or its layers' key and value
    tensors (DynamicCache)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
