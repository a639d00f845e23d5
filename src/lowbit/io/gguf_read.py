"""GGUF v3 files read back into torch: a bounds-checked walk of the header first (a truncated or corrupt
file is a one-line LowbitError, never an exception from deep inside a parser or a read past the end),
then gguf-py's GGUFReader; quantised matrices become GGMLLinear modules holding the file's bytes, q/k
rows are put back in Hugging Face order. Llama-architecture files (what lowbit's writer, io/gguf.py,
produces, and llama.cpp's converter for Llama models).
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import register_importer
from lowbit.io.gguf import GPT2_REGEX_PRES, HF_JSON_KEY, TOKEN_CONTROL, unrope_permutation
from lowbit.io.gguf_rope import rope_from_gguf
from lowbit.io.progress import tensor_bar
from lowbit.nn import GGMLLinear
from lowbit.pipeline.arch import ARCHES
from lowbit.weights.ggml import BLOCK_TYPES, GGMLTensor

LAYER_ROLES = dict(ARCHES["llama"].roles)    # Hugging Face module in a block -> GGUF role

# ----------------------------------------------------------------------------------------------------
# Reader: a bounds-checked walk of the header, then gguf-py's GGUFReader
# ----------------------------------------------------------------------------------------------------
# GGUF metadata value types -> struct formats (8 is a string, 9 an array).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_SCALAR_SIZES = {k: struct.calcsize(f) for k, f in _SCALAR_FORMATS.items()}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4


class _Header:
    """Reads the header of a GGUF file with every length checked against what is left of the file."""

    def __init__(self, data, path):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str):
        raise LowbitError(f"{self.path}: {what} at byte {self.pos} (truncated or corrupt GGUF file)")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"needs {n} more bytes")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def left(self) -> int:
        return len(self.data) - self.pos

    def string(self) -> str:
        n = self.u64()
        if n > self.left():
            self.fail(f"string of {n} bytes runs past the end")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            self.fail("string is not UTF-8")

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALAR_FORMATS:
            return struct.unpack(_SCALAR_FORMATS[vtype], self.take(_SCALAR_SIZES[vtype]))[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth < 2:
            item, count = self.u32(), self.u64()
            if item in _SCALAR_SIZES:
                if count * _SCALAR_SIZES[item] > self.left():
                    self.fail(f"array of {count} items runs past the end")
                self.take(count * _SCALAR_SIZES[item])
                return None
            if count * 8 > self.left():
                self.fail(f"array of {count} items runs past the end")
            for _ in range(count):
                self.value(item, depth + 1)
            return None
        self.fail(f"unknown metadata value type {vtype}")


def check_gguf_structure(path) -> None:
    """Walk header, metadata and tensor table; check every tensor's bytes lie inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"no such file: {path}")
    if path.stat().st_size < 24:
        raise LowbitError(f"{path}: too short to be a GGUF file ({path.stat().st_size} bytes)")
    h = _Header(np.memmap(path, mode="r"), path)
    if h.take(4) != b"GGUF":
        raise LowbitError(f"{path}: not a GGUF file (bad magic)")
    version = h.u32()
    if version not in (2, 3):
        h.fail(f"unsupported GGUF version {version}")
    n_tensors, n_kv = h.u64(), h.u64()
    if n_kv * 12 > h.left() or n_tensors * 28 > h.left():
        h.fail(f"{n_kv} metadata entries / {n_tensors} tensors cannot fit in the file")
    alignment = 32
    for _ in range(n_kv):
        key, vtype = h.string(), h.u32()
        value = h.value(vtype)
        if key == "general.alignment":
            if vtype != 4 or not value or value & (value - 1):
                h.fail("general.alignment must be a u32 power of two")
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name, n_dims = h.string(), h.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            h.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [h.u64() for _ in range(n_dims)]
        raw_type, offset = h.u32(), h.u64()
        infos.append((name, dims, raw_type, offset))
    data_start = h.pos + (-h.pos) % alignment
    for name, dims, raw_type, offset in infos:
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise LowbitError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}")
        n = int(np.prod(dims, dtype=object))
        if any(d == 0 for d in dims) or dims[0] % block or n > 1 << 48:
            raise LowbitError(f"{path}: tensor {name!r} has impossible shape {dims} for its type")
        if offset % alignment or data_start + offset + n // block * size > len(h.data):
            raise LowbitError(f"{path}: tensor {name!r} lies outside the file (truncated or corrupt)")


def open_gguf(path):
    """gguf-py's reader on a file that has passed check_gguf_structure; its errors become LowbitError."""
    from gguf import GGUFReader

    check_gguf_structure(path)
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError/KeyError/IndexError on malformed content
        raise LowbitError(f"{path}: cannot parse GGUF file: {e}") from e


def _fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:   # undecodable values of keys we do not use are skipped
            continue
    return out


def _need(meta: dict, key: str, kind=int, default=None):
    """meta[key] as `kind`; `default` when absent (None: the key is required)."""
    if key not in meta:
        if default is None:
            raise LowbitError(f"GGUF file lacks {key}")
        return default
    try:
        return kind(meta[key])
    except (TypeError, ValueError, OverflowError):
        raise LowbitError(f"GGUF key {key} has an unusable value {str(meta[key])[:40]!r}")


def llama_config_from_gguf(meta: dict, vocab: int, tied: bool, table: dict | None = None):
    """A transformers LlamaConfig from the llama.* keys (the vocabulary size from the embedding's rows)
    and the rope scaling its keys and rope_freqs tensor describe (io/gguf_rope.py)."""
    from transformers import LlamaConfig

    if meta.get("general.architecture") != "llama":
        arch = meta.get("general.architecture")
        raise LowbitError(f"lowbit reads GGUF files of the llama architecture, not {arch!r}")
    hidden = _need(meta, "llama.embedding_length")
    heads = _need(meta, "llama.attention.head_count")
    kv = _need(meta, "llama.attention.head_count_kv", int, heads)
    rope_dim = _need(meta, "llama.rope.dimension_count", int, hidden // max(heads, 1))
    head_dim = _need(meta, "llama.attention.key_length", int, rope_dim)
    if min(hidden, heads, kv, head_dim) <= 0 or heads % kv:
        raise LowbitError(f"GGUF file has inconsistent attention sizes: {heads} heads, {kv} KV heads, dim {head_dim}")
    if rope_dim != head_dim:
        raise LowbitError("partial rotary embeddings are not supported")
    token_id = lambda key: _need(meta, key, int, -1) if key in meta else None  # noqa: E731
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=_need(meta, "llama.feed_forward_length"),
        num_hidden_layers=_need(meta, "llama.block_count"), num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, rms_norm_eps=_need(meta, "llama.attention.layer_norm_rms_epsilon", float),
        max_position_embeddings=_need(meta, "llama.context_length", int, 2048),
        rope_parameters=rope_from_gguf(meta, table or {}, _need(meta, "llama.rope.freq_base", float, 10000.0), head_dim),
        tie_word_embeddings=tied, bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"))


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """GGUF name -> shape (rows, cols) as torch sees it."""
    h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    per_layer = {"attn_norm": (h,), "ffn_norm": (h,), "attn_q": (config.num_attention_heads * d, h),
                 "attn_k": (config.num_key_value_heads * d, h), "attn_v": (config.num_key_value_heads * d, h),
                 "attn_output": (h, config.num_attention_heads * d), "ffn_gate": (f, h), "ffn_up": (f, h),
                 "ffn_down": (h, f)}
    out = {"token_embd.weight": (config.vocab_size, h), "output_norm.weight": (h,)}
    if not config.tie_word_embeddings:
        out["output.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        out.update({f"blk.{i}.{role}.weight": shape for role, shape in per_layer.items()})
    return out


def _tensor_table(reader) -> dict:
    from gguf import GGMLQuantizationType

    table = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        table[t.name] = (shape, GGMLQuantizationType(t.tensor_type).name, t.data)
    return table


def _check_tensors(table: dict, config) -> None:
    expected = _expected_shapes(config)
    missing = [n for n in expected if n not in table]
    extra = [n for n in table if n not in expected and not n.startswith("rope_freqs")]
    if missing or extra:
        raise LowbitError(f"GGUF tensors do not match a Llama model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in expected.items():
        if table[name][0] != shape:
            raise LowbitError(f"GGUF tensor {name} has shape {table[name][0]}, the metadata implies {shape}")


def _float_weight(name: str, shape, ggml_type: str, data) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    if ggml_type in ("F32", "F16"):
        w = torch.from_numpy(np.array(data, dtype=np.float32))
    else:
        try:
            w = torch.from_numpy(np.array(quants.dequantize(np.array(data), GGMLQuantizationType[ggml_type])))
        except NotImplementedError:
            raise LowbitError(f"GGUF tensor {name} has type {ggml_type}, which cannot be dequantised here")
    w = w.reshape(shape).float()
    if not torch.isfinite(w).all():
        raise LowbitError(f"GGUF tensor {name} contains NaN or infinite values")
    return w


def _linear_module(name: str, shape, ggml_type: str, data, rows: torch.Tensor | None, dequantize: bool) -> nn.Module:
    if ggml_type in BLOCK_TYPES and not dequantize:
        blocks = torch.from_numpy(np.array(data, dtype=np.uint8).reshape(shape[0], -1))
        if rows is not None:
            blocks = blocks[rows].contiguous()
        module = GGMLLinear.from_tensor(GGMLTensor(blocks, ggml_type, torch.Size(shape)))
        if not torch.isfinite(module.dequantized_weight()).all():
            raise LowbitError(f"GGUF tensor {name} contains NaN or infinite values")
        return module
    w = _float_weight(name, shape, ggml_type, data)
    linear = nn.Linear(shape[1], shape[0], bias=False)
    linear.weight.data = w if rows is None else w[rows].contiguous()
    return linear


def gguf_tokenizer(meta: dict):
    """The Hugging Face tokenizer of a GGUF file's metadata, or None when it has none we can rebuild."""
    try:
        return _gguf_tokenizer(meta)
    except LowbitError:
        raise
    except Exception as e:   # tokenizers / transformers raise their own types on malformed vocabularies
        raise LowbitError(f"GGUF tokenizer metadata is unusable: {str(e).splitlines()[0][:80]}") from e


def _gguf_tokenizer(meta: dict):
    """The stored tokenizer.json when present, else rebuilt from the byte-level BPE vocabulary and
    merges (tokenizer.ggml.model 'gpt2')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = meta.get("tokenizer.ggml.tokens")
    if HF_JSON_KEY in meta:
        backend = Tokenizer.from_str(meta[HF_JSON_KEY])
    elif meta.get("tokenizer.ggml.model") == "gpt2" and tokens and meta.get("tokenizer.ggml.pre") in GPT2_REGEX_PRES:
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type", [])
        backend.add_special_tokens([t for t, k in zip(tokens, types) if k == TOKEN_CONTROL])
        bos = meta.get("tokenizer.ggml.bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)])
    else:
        return None
    roles = {}
    # the keys as gguf-py's GGUFWriter writes them (add_pad_token_id: padding_token_id ...)
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tokens and tid is not None and 0 <= tid < len(tokens):
            roles[f"{role}_token"] = tokens[tid]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)


def load_gguf(path, dequantize: bool = False, progress: bool = False):
    """(model, tokenizer or None) from a GGUF file of a Llama model. Quantised matrices become GGMLLinear
    modules holding the file's blocks (dequantize=True: plain float Linears); q/k rows are put back in
    Hugging Face order. progress: a bar over the file's tensors on stderr (lowbit.io.progress)."""
    reader = open_gguf(path)
    try:
        meta, table = _fields(reader), _tensor_table(reader)
    except Exception as e:
        raise LowbitError(f"{path}: cannot parse GGUF file: {e}") from e
    if "token_embd.weight" not in table:
        raise LowbitError(f"{path}: GGUF file has no token_embd.weight")
    config = llama_config_from_gguf(meta, table["token_embd.weight"][0][0], "output.weight" not in table, table)
    _check_tensors(table, config)
    model = _build_llama(config, table, dequantize, progress)
    if isinstance(meta.get("general.name"), str) and meta["general.name"]:
        model.lowbit_source_name = meta["general.name"]   # kept when the model is saved and exported again
    recipe = _file_type_recipe(meta.get("general.file_type"))
    if recipe is not None:
        model.lowbit_recipe = recipe    # exported again, the file keeps its file type (Q4_K_M, not Q4_K_S)
    return model, gguf_tokenizer(meta)


def _file_type_recipe(code):
    """The recipe of the llama.cpp file type `code` (general.file_type) names, when lowbit has its method."""
    from lowbit.methods import METHODS
    from lowbit.methods.ggml_mix import FILE_TYPES
    from lowbit.methods.recipe import Recipe

    name = next((k for k, v in FILE_TYPES.items() if v.file_type == code), None)
    return Recipe(name) if name in METHODS else None


def _norm(name: str, table: dict) -> nn.Parameter:
    return nn.Parameter(_float_weight(name, *table[name]), requires_grad=False)


def _build_llama(config, table: dict, dequantize: bool, progress: bool = False):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):      # every tensor is replaced below: nothing to allocate twice
        model = LlamaForCausalLM(config)
    embedding = _float_weight("token_embd.weight", *table["token_embd.weight"])
    model.model.embed_tokens = nn.Embedding.from_pretrained(embedding, freeze=True)
    model.model.norm.weight = _norm("output_norm.weight", table)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    # a bar over every tensor of the file: a block's as it is built, then the rest (embedding, norm, head;
    # rope_freqs was read with the metadata)
    with tensor_bar(len(table), "GGUF tensors", progress) as bar:
        for i, layer in enumerate(model.model.layers):
            _build_block(layer, i, table, heads, dequantize)
            bar.update(len(LAYER_ROLES))
        bar.update(sum(not n.startswith("blk.") for n in table))
    if config.tie_word_embeddings:
        model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head = _linear_module("output.weight", *table["output.weight"], None, dequantize)
    _materialise_buffers(model)
    return model.eval()


def _build_block(layer: nn.Module, i: int, table: dict, heads: dict, dequantize: bool) -> None:
    """Decoder block i's norms and Linears from the file's tensors, q/k rows back in Hugging Face order."""
    for suffix, role in LAYER_ROLES.items():
        name = f"blk.{i}.{role}.weight"
        if role.endswith("_norm"):
            layer.get_submodule(suffix).weight = _norm(name, table)
            continue
        shape, ggml_type, data = table[name]
        rows = unrope_permutation(shape[0], heads[role]) if role in heads else None
        _set(layer, suffix, _linear_module(name, shape, ggml_type, data, rows, dequantize))


def _set(parent: nn.Module, dotted: str, module: nn.Module) -> None:
    owner, _, leaf = dotted.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, leaf, module)


def _materialise_buffers(model) -> None:
    """The model was built on the meta device; its rotary tables (computed, not stored) are rebuilt."""
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise LowbitError(f"GGUF load left tensors unset: {leftovers[:3]}")


register_importer("gguf", load_gguf)
