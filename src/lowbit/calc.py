"""Memory calculators: weights at a given precision, and the KV cache.

GB = 1e9 bytes, GiB = 2**30 bytes; both are printed because vendors and tools disagree on which to use.
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass

from lowbit.errors import LowbitError

from lowbit.units import GB, GIB, budget_linear_bytes, parse_size  # noqa: F401  (re-exported: calc is where users look)

# Storage bits per element of the plain precisions.
PRECISION_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "fp6": 6, "int4": 4,
                  "nf4": 4, "fp4": 4, "int3": 3, "int2": 2, "ternary": 1.58}

# Precisions of the default weight table: (label, element bits, group size or None, scale bits per group).
DEFAULT_WEIGHT_ROWS = [
    ("fp32", 32, None, 0), ("fp16", 16, None, 0), ("int8", 8, None, 0),
    ("int4", 4, None, 0), ("int4-g128", 4, 128, 16), ("nf4-b64", 4, 64, 32),
    ("int3-g128", 3, 128, 16), ("int2", 2, None, 0),
]


@dataclass
class MemoryRow:
    precision: str
    bits_per_weight: float
    bytes: float
    gb: float
    gib: float


def bits_per_weight(bits: float, group_size: int | None = None, scale_bits: int = 16, zero_bits: int = 0) -> float:
    """Element bits plus the per-group scale (and zero point) overhead, e.g. int4 g128 fp16 = 4.125."""
    if bits <= 0:
        raise LowbitError(f"bits must be positive, got {bits}")
    if group_size is None:
        return float(bits)
    if group_size < 1:
        raise LowbitError(f"group size must be positive, got {group_size}")
    return bits + (scale_bits + zero_bits) / group_size


def weight_memory(params: float, bits: float, group_size: int | None = None,
                  scale_bits: int = 16, zero_bits: int = 0, label: str | None = None) -> MemoryRow:
    if not (params > 0 and math.isfinite(params)):
        raise LowbitError(f"parameter count must be a positive finite number, got {params}")
    bpw = bits_per_weight(bits, group_size, scale_bits, zero_bits)
    nbytes = params * bpw / 8
    return MemoryRow(label or f"{bits}-bit", bpw, nbytes, nbytes / GB, nbytes / GIB)


def weight_table(params: float) -> list[MemoryRow]:
    return [weight_memory(params, bits, g, s, label=name) for name, bits, g, s in DEFAULT_WEIGHT_ROWS]


@dataclass
class KVCacheSize:
    layers: int
    kv_heads: int
    head_dim: int
    seq_len: int
    batch: int
    dtype: str
    bits_per_element: float
    bytes: float
    gb: float
    gib: float


def kv_cache_memory(layers: int, kv_heads: int, head_dim: int, seq_len: int, batch: int = 1,
                    dtype: str = "fp16") -> KVCacheSize:
    """2 (K and V) x layers x kv_heads x head_dim x seq_len x batch x bytes per element.

    kv_heads is the number of key/value heads: smaller than the query heads under grouped-query attention.
    """
    for name, v in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                    ("seq_len", seq_len), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise LowbitError(f"{name} must be a positive integer, got {v!r}")
    if dtype not in PRECISION_BITS:
        raise LowbitError(f"unknown dtype {dtype!r}; known: {', '.join(PRECISION_BITS)}")
    bits = PRECISION_BITS[dtype]
    nbytes = 2 * layers * kv_heads * head_dim * seq_len * batch * bits / 8
    return KVCacheSize(layers, kv_heads, head_dim, seq_len, batch, dtype, bits, nbytes, nbytes / GB, nbytes / GIB)


def quantized_kv_cache_memory(layers: int, kv_heads: int, head_dim: int, seq_len: int, batch: int = 1,
                              scheme="int4", window_dtype: str = "fp16") -> KVCacheSize:
    """A quantised KV cache (lowbit's, KIVI layout: weights/kv.py) holding seq_len tokens: whole chunks of
    `residual` tokens quantised (packed codes, fp16 scale and a one-byte zero point per group), the
    remaining seq_len mod residual newest tokens at `window_dtype`. bits_per_element is the average."""
    from lowbit.weights.kv import KVSpec, kv_chunk_bits

    spec = KVSpec.parse(scheme) if isinstance(scheme, str) else scheme
    fp = kv_cache_memory(layers, kv_heads, head_dim, seq_len, batch, window_dtype)
    if window_dtype not in ("fp32", "fp16", "bf16"):
        raise LowbitError(f"the newest tokens stay in the model's precision (fp32, fp16, bf16), not {window_dtype!r}")
    quantised = seq_len // spec.residual * spec.residual
    key_bits, value_bits = kv_chunk_bits(spec, head_dim)
    per_token = layers * kv_heads * head_dim * batch
    nbytes = (per_token * quantised * (key_bits + value_bits)
              + 2 * per_token * (seq_len - quantised) * fp.bits_per_element) / 8
    bits = nbytes * 8 / (2 * per_token * seq_len)
    return KVCacheSize(layers, kv_heads, head_dim, seq_len, batch, spec.name, bits, nbytes, nbytes / GB, nbytes / GIB)


def as_dict(row) -> dict:
    return asdict(row)


# ---------------------------------------------------------------------------------------------------------
# Whole models: a dense decoder's shape, and its size under a method (exact, from the planned weights).

@dataclass(frozen=True)
class ModelShape:
    """A dense Llama-style decoder: per block q, k, v, o and a gated MLP (gate, up, down), two norms;
    token embedding and output head (tied or not), a final norm."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    def linears(self) -> list[tuple[str, str, int, tuple[int, int]]]:
        """(name, GGUF role, block, [out, in]) of every Linear in the blocks."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        per_block = [("self_attn.q_proj", "attn_q", (q, h)), ("self_attn.k_proj", "attn_k", (kv, h)),
                     ("self_attn.v_proj", "attn_v", (kv, h)), ("self_attn.o_proj", "attn_output", (h, q)),
                     ("mlp.gate_proj", "ffn_gate", (i, h)), ("mlp.up_proj", "ffn_up", (i, h)),
                     ("mlp.down_proj", "ffn_down", (h, i))]
        return [(f"model.layers.{b}.{n}", role, b, shape) for b in range(self.layers) for n, role, shape in per_block]

    @property
    def linear_params(self) -> int:
        return sum(o * i for *_, (o, i) in self.linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> "ModelShape":
        """From a Hugging Face config.json (dict) of a dense decoder; LowbitError naming what is missing."""
        c = config.get("text_config", config) if isinstance(config, dict) else None
        if not isinstance(c, dict):
            raise LowbitError("config.json must hold a JSON object")
        if any(k in c for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise LowbitError("mixture-of-experts models are not modelled by the size calculator yet")
        need = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
        missing = [k for k in need if not isinstance(c.get(k), int) or c.get(k) < 1]
        if missing:
            raise LowbitError(f"config.json lacks {', '.join(missing)}: not a dense decoder the calculator models")
        heads = c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or heads
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise LowbitError(f"config.json: num_attention_heads ({heads}) must be a multiple of "
                              f"num_key_value_heads ({kv_heads})")
        if not isinstance(head_dim, int) or head_dim < 1:
            raise LowbitError(f"config.json: head_dim (or hidden_size / num_attention_heads) must be a positive "
                              f"integer, got {head_dim!r}")
        return cls(name, c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], heads, kv_heads,
                   head_dim, c["vocab_size"], bool(c.get("tie_word_embeddings", False)))


# Shapes of the classes people ask about (the published configs).
PRESET_SHAPES = {
    "7b": ModelShape("Llama-2-7B", 32, 4096, 11008, 32, 32, 128, 32000),
    "8b": ModelShape("Llama-3-8B", 32, 4096, 14336, 32, 8, 128, 128256),
    "13b": ModelShape("Llama-2-13B", 40, 5120, 13824, 40, 40, 128, 32000),
    "70b": ModelShape("Llama-2-70B", 80, 8192, 28672, 64, 8, 128, 32000),
    "405b": ModelShape("Llama-3.1-405B", 126, 16384, 53248, 128, 8, 128, 128256),
}


@dataclass
class ModelSize:
    method: str
    linear_bytes: int
    other_bytes: int       # embeddings, head, norms
    bytes: int
    bits_per_weight: float  # over every parameter
    gb: float


def model_size(shape: ModelShape, method: str | None) -> ModelSize:
    """Bytes of `shape` quantised by lowbit method `method` (a short name; None = fp16), from the weights
    the method plans for every Linear (exact storage, the same count `lowbit eval` reports). GGUF file
    types (q4_k_m, ...) also type the embedding and output as llama-quantize does, norms F32; other
    methods keep embeddings, head and norms at fp16, as vLLM and transformers load them."""
    from lowbit.methods import parse_method

    if method in (None, "fp16", "bf16"):
        linear, other = 2 * shape.linear_params, 2 * (shape.embedding_params + shape.norm_params)
    else:
        config = parse_method(method)
        linear = sum(_planned_bytes(config, shape, *row) for row in shape.linears())
        other = _gguf_other_bytes(shape, method) if _is_gguf(method) else 2 * (shape.embedding_params + shape.norm_params)
    total = linear + other
    return ModelSize(method or "fp16", linear, other, total, 8 * total / shape.params, total / GB)


def _planned_bytes(config, shape: ModelShape, name: str, role: str, block: int, out_in) -> int:
    from lowbit.methods.base import LayerInfo

    import torch

    info = LayerInfo(name, role, block, shape.layers, shape.heads // shape.kv_heads)
    weight = config.for_layer(info).planned_weight(torch.Size(out_in), info)
    if weight is None:
        raise LowbitError(f"{config.short_name()} cannot say its size before quantising")
    return weight.nbytes


def _is_gguf(method: str) -> bool:
    from lowbit.methods.ggml_mix import FILE_TYPES

    return method.lower() in FILE_TYPES


def _gguf_other_bytes(shape: ModelShape, ftype: str) -> int:
    from lowbit.methods.ggml_mix import role_type
    from lowbit.weights.ggml import row_nbytes

    gqa = shape.heads // shape.kv_heads
    embd = row_nbytes(role_type(ftype, "token_embd", None, shape.layers, shape.hidden, gqa, shape.tied_embeddings),
                      shape.hidden) * shape.vocab
    head = 0 if shape.tied_embeddings else row_nbytes(
        role_type(ftype, "output", None, shape.layers, shape.hidden, gqa), shape.hidden) * shape.vocab
    return embd + head + 4 * shape.norm_params


# ---------------------------------------------------------------------------------------------------------
# Budgeted mixes (`lowbit quantize --budget`): their size, known before the knapsack runs.

def mix_size(shape: ModelShape, bits_per_weight: float, gguf_file_types: tuple[str, ...] = ()) -> ModelSize:
    """Upper bound of the bytes of `shape` quantised as a budgeted mix at `bits_per_weight` over its
    Linears: the knapsack never exceeds the budget. The rest of the model is fp16 as lowbit keeps it, or,
    given the GGUF file types the writer may infer for the mix (io/gguf.infer_file_type: that of the most
    common block type), the largest embedding, head and norms those types give."""
    linear = budget_linear_bytes(bits_per_weight, shape.linear_params)
    if gguf_file_types:
        other = max(_gguf_other_bytes(shape, ftype) for ftype in gguf_file_types)
    else:
        other = 2 * (shape.embedding_params + shape.norm_params)
    total = linear + other
    return ModelSize(f"mix {bits_per_weight}bpw", linear, other, total, 8 * total / shape.params, total / GB)


# ---------------------------------------------------------------------------------------------------------
# What an engine holds beside the weights and the KV cache while it runs.

LLAMACPP_UBATCH = 512       # llama.cpp's default n_ubatch (llama_context_default_params)


def llamacpp_compute_buffer(shape: ModelShape, n_ctx: int, n_seq: int = 1, n_ubatch: int = LLAMACPP_UBATCH) -> int:
    """Bytes llama.cpp reserves beside weights and KV cache, every layer on one device, flash attention
    on (the default `-fa auto` where the backend has it, CPU and CUDA): its compute buffer, the larger of

        feed-forward stage   4 u (3 intermediate + 4 hidden) + 2 u n_ctx    (fp32 activations, fp16 KQ mask)
        output stage         4 u (n_vocab + 2 hidden)                       (fp32 logits of the whole ubatch)

    with u = min(n_ubatch, n_ctx), plus its output buffer, 4 n_vocab n_seq (the logits handed back).
    n_ctx counts the tokens of every sequence (context x batch). Source: the buffer sizes llama.cpp
    itself reports ("compute buffer size", "output buffer size"; llama-cpp-python 0.3.36, CPU), measured
    on ten Llama shapes at 2K to 16K tokens: never below them, equal where the logits dominate, at most a
    third above where the feed-forward does (ggml's allocator reuses buffers in ways no closed form follows;
    tests/test_runtime_reserve.py). The logits term is the worst-case graph's n_ubatch x n_vocab fp32
    logits that ik_llama.cpp PR #1560 describes (github.com/ikawrakow/ik_llama.cpp/pull/1560). With `-fa off`
    the fp32 attention scores,
    4 u n_ctx n_head bytes, come on top."""
    u = min(n_ubatch, n_ctx)
    feed_forward = 4 * u * (3 * shape.intermediate + 4 * shape.hidden) + 2 * u * n_ctx
    output = 4 * u * (shape.vocab + 2 * shape.hidden)
    return max(feed_forward, output) + 4 * shape.vocab * n_seq


def transformers_prefill_activations(shape: ModelShape, tokens: int, bytes_per_element: int = 2) -> int:
    """Peak bytes of activations while transformers runs a Llama-style decoder over `tokens` positions at
    once (the prompt's prefill, SDPA attention, the logits of the last position only, as `generate` asks),
    beyond weights and KV cache. The peak is at the gated MLP of a layer past the first, where live are
    per token (4 hidden + 3 intermediate + 2 head_dim) elements: the input embeddings and the layer's
    input (still referenced by LlamaModel.forward), the residual and the normed input, act(gate), up and
    their product, the rotary cos and sin; plus the int64 token ids and attention mask, 16 bytes.
    Source: transformers' modeling_llama.py (LlamaModel, LlamaDecoderLayer and LlamaMLP forward), equal to
    the allocator's peak in torch's profiler on two shapes (tests/test_runtime_reserve.py)."""
    per_token = (4 * shape.hidden + 3 * shape.intermediate + 2 * shape.head_dim) * bytes_per_element + 16
    return tokens * per_token
