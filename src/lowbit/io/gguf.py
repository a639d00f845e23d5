"""GGUF v3: write Llama models as llama.cpp loads them, and read such files back into torch.

Writer: the container is gguf-py's GGUFWriter (llama.cpp's own library); the quantisation is ours
(methods/ggml.py), with the per-tensor types of llama.cpp's file types (methods/ggml_mix.py). Weights
already held as ggml blocks (GGMLLinear, from `lowbit quantize --method q4_k_m`) are copied as they are;
float weights are quantised here. q and k rows are permuted from Hugging Face's rotate-half layout to
the interleaved pairs llama.cpp's rope expects (what convert_hf_to_gguf.py does).

Reader: a bounds-checked walk of the header first (a truncated or corrupt file is a one-line
LowbitError, never an exception from deep inside a parser or a read past the end), then gguf-py's
GGUFReader; quantised matrices become GGMLLinear modules holding the file's bytes.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import register_exporter, register_importer
from lowbit.methods.ggml import BLOCK_TYPES, GGMLTensor, quantize_ggml
from lowbit.methods.ggml_mix import FILE_TYPES, LAYER_ROLES, file_type, gguf_name, tensor_type

QUANTIZATION_VERSION = 2
HF_JSON_KEY = "tokenizer.huggingface.json"
GPT2_REGEX_PRES = ("gpt-2",)    # pre-tokenizer names whose regex is GPT-2's ByteLevel one
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
# A fragment only the Llama-3 pre-tokenizer regex (llama.cpp's "llama-bpe") has: digits in runs of <= 3.
LLAMA3_REGEX_MARK = "\\p{N}{1,3}"


# ----------------------------------------------------------------------------------------------------
# q/k row order
# ----------------------------------------------------------------------------------------------------
def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp wants for a q or k weight: per head, HF rows i and i + d/2 become 2i, 2i+1."""
    if rows % n_head or (rows // n_head) % 2:
        raise LowbitError(f"cannot split {rows} rows into {n_head} heads of even size")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def unrope_permutation(rows: int, n_head: int) -> torch.Tensor:
    return torch.argsort(rope_permutation(rows, n_head))


# ----------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------
def _check_llama(config) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise LowbitError(f"GGUF export supports Llama-architecture models, not {getattr(config, 'model_type', '?')!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise LowbitError("GGUF export does not handle Llama models with attention or MLP biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise LowbitError(f"llama.cpp's llama architecture uses SiLU, this model uses {config.hidden_act!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise LowbitError(f"GGUF export supports plain rope only, not rope_type {rope.get('rope_type')!r}")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


def _n_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _write_hparams(writer, config, ftype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_n_kv_heads(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(FILE_TYPES[ftype].file_type)
    writer.add_quantization_version(QUANTIZATION_VERSION)


def _pre_tokenizer_name(spec: dict | None) -> str:
    """tokenizer.ggml.pre for a tokenizers pre_tokenizer, where llama.cpp has the same regex."""
    spec = spec or {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space", False):
        return "gpt-2"
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    patterns = [json.dumps(s.get("pattern", {})) for s in steps if s.get("type") == "Split"]
    if len(steps) == 2 and steps[-1].get("type") == "ByteLevel" and patterns and LLAMA3_REGEX_MARK in patterns[0]:
        return "llama-bpe"
    raise LowbitError(f"no llama.cpp pre-tokenizer matches this tokenizer's ({spec.get('type')}); "
                      "pass tokenizer_pre= to choose one")


def _token_type(i: int, by_id: dict, added: dict) -> int:
    if i not in by_id:
        return TOKEN_UNUSED
    if i in added:
        return TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED
    return TOKEN_NORMAL


def _merge_strings(merges) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _write_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LowbitError("GGUF export handles byte-level BPE tokenizers (GPT-2 / Llama-3 style) only")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in backend.get("added_tokens", [])}
    for tid, t in added.items():
        vocab.setdefault(t["content"], tid)
    by_id = {i: tok for tok, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise LowbitError(f"tokenizer has ids up to {max(by_id)} but the model's vocabulary is {vocab_size}")
    # Rows of the embedding beyond the tokenizer get placeholder tokens, as convert_hf_to_gguf does.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [_token_type(i, by_id, added) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _pre_tokenizer_name(backend.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merge_strings(model.get("merges", [])))
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            add(int(tid))
    writer.add_add_bos_token(_adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    writer.add_string(HF_JSON_KEY, tokenizer.backend_tokenizer.to_str())


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def _source(module: nn.Module):
    """A weight as ggml blocks (GGMLTensor) when the module holds them, else as float32."""
    if hasattr(module, "quantized") and isinstance(module.quantized(), GGMLTensor):
        return module.quantized()
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight().float()
    return module.weight.detach().float()


def _permute(source, n_head: int):
    idx = rope_permutation(source.shape[0], n_head)
    if isinstance(source, GGMLTensor):
        return GGMLTensor(source.data[idx].contiguous(), source.type, source.shape, source.dtype)
    return source[idx]


def _stored_bytes(name: str, source, choose_type, importance, search: bool) -> tuple[np.ndarray, str]:
    """(uint8 array as GGUF stores it, ggml type): blocks are copied, float weights quantised."""
    if isinstance(source, GGMLTensor):
        return source.data.numpy(), source.type
    if source.dim() == 1:
        return quantize_ggml(source.reshape(1, -1), "F32").reshape(-1), "F32"
    ggml_type = choose_type(name, source.shape[-1])
    return quantize_ggml(source, ggml_type, importance, search), ggml_type


def _is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or getattr(out, "weight", None) is model.get_input_embeddings().weight


def gguf_tensors(model, ftype: str, imatrix: dict | None = None, search: bool = True):
    """(GGUF name, uint8 array, ggml type) for every tensor of a Llama model, in llama.cpp's order."""
    config = model.config
    n_layers, n_heads, n_kv = config.num_hidden_layers, config.num_attention_heads, _n_kv_heads(config)
    tied = _is_tied(model)

    def choose_type(name, cols):
        return tensor_type(ftype, name, n_layers, cols, n_heads // n_kv, tied, imatrix is not None)

    names = ["model.embed_tokens"]
    names += [f"model.layers.{i}.{suffix}" for i in range(n_layers) for suffix in LAYER_ROLES]
    names += ["model.norm"] + ([] if tied else ["lm_head"])
    for hf in names:
        source = _source(model.get_submodule(hf))
        if hf.endswith("q_proj") or hf.endswith("k_proj"):
            source = _permute(source, n_heads if hf.endswith("q_proj") else n_kv)
        name = gguf_name(hf + ".weight")
        importance = None if imatrix is None else imatrix.get(hf)
        data, stored = _stored_bytes(name, source, choose_type, importance, search)
        yield name, data, stored


def export_gguf(model, out_path, tokenizer=None, type: str = "Q4_K_M", imatrix: dict | None = None,
                search: bool = True, tokenizer_pre: str | None = None, name: str | None = None) -> Path:
    """Write `model` (a Llama model, or a path to one) as a GGUF file of llama.cpp file type `type`
    ("Q4_K_M", "Q8_0", "F16", ...). Linears the pipeline already holds as ggml blocks are copied.

    imatrix: optional {HF Linear name: mean squared input activation per column} (llama.cpp's imatrix).
    search:  False quantises exactly as llama-quantize would; True searches further (methods/ggml.py).
    """
    from gguf import GGMLQuantizationType, GGUFWriter

    if isinstance(model, (str, os.PathLike)):
        from lowbit.api import load_model
        model, loaded_tok = load_model(model)
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise LowbitError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    _check_llama(model.config)
    ftype = file_type(type)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp, "llama")
        source_name = Path(getattr(model.config, "_name_or_path", "") or "lowbit-model").name
        _write_hparams(writer, model.config, ftype, name or source_name)
        _write_tokenizer(writer, tokenizer, model.config.vocab_size, tokenizer_pre)
        with torch.no_grad():
            for tname, data, stored in gguf_tensors(model, ftype, imatrix, search):
                writer.add_tensor(tname, data, raw_dtype=GGMLQuantizationType[stored])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


register_exporter("gguf", export_gguf)


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


def llama_config_from_gguf(meta: dict, vocab: int, tied: bool):
    """A transformers LlamaConfig from the llama.* keys (the vocabulary size from the embedding's rows)."""
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
        rope_parameters={"rope_type": "default", "rope_theta": _need(meta, "llama.rope.freq_base", float, 10000.0)},
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
    from lowbit.nn.ggml_linear import GGMLLinear

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
    for role in ("bos", "eos", "pad", "unk"):
        tid = meta.get(f"tokenizer.ggml.{role}_token_id")
        if tokens and tid is not None and 0 <= tid < len(tokens):
            roles[f"{role}_token"] = tokens[tid]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)


def load_gguf(path, dequantize: bool = False):
    """(model, tokenizer or None) from a GGUF file of a Llama model. Quantised matrices become GGMLLinear
    modules holding the file's blocks (dequantize=True: plain float Linears); q/k rows are put back in
    Hugging Face order."""
    reader = open_gguf(path)
    try:
        meta, table = _fields(reader), _tensor_table(reader)
    except Exception as e:
        raise LowbitError(f"{path}: cannot parse GGUF file: {e}") from e
    if "token_embd.weight" not in table:
        raise LowbitError(f"{path}: GGUF file has no token_embd.weight")
    config = llama_config_from_gguf(meta, table["token_embd.weight"][0][0], "output.weight" not in table)
    _check_tensors(table, config)
    model = _build_llama(config, table, dequantize)
    return model, gguf_tokenizer(meta)


def _norm(name: str, table: dict) -> nn.Parameter:
    return nn.Parameter(_float_weight(name, *table[name]), requires_grad=False)


def _build_llama(config, table: dict, dequantize: bool):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):      # every tensor is replaced below: nothing to allocate twice
        model = LlamaForCausalLM(config)
    embedding = _float_weight("token_embd.weight", *table["token_embd.weight"])
    model.model.embed_tokens = nn.Embedding.from_pretrained(embedding, freeze=True)
    model.model.norm.weight = _norm("output_norm.weight", table)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for i, layer in enumerate(model.model.layers):
        for suffix, role in LAYER_ROLES.items():
            name = f"blk.{i}.{role}.weight"
            if role.endswith("_norm"):
                layer.get_submodule(suffix).weight = _norm(name, table)
                continue
            shape, ggml_type, data = table[name]
            rows = unrope_permutation(shape[0], heads[role]) if role in heads else None
            _set(layer, suffix, _linear_module(name, shape, ggml_type, data, rows, dequantize))
    if config.tie_word_embeddings:
        model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head = _linear_module("output.weight", *table["output.weight"], None, dequantize)
    _materialise_buffers(model)
    return model.eval()


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
