"""GGUF v3: write Llama models as llama.cpp loads them (the reader is io/gguf_read.py).

The container is gguf-py's GGUFWriter (llama.cpp's own library); the quantisation is ours
(lowbit.weights.ggml), with the per-tensor types of llama.cpp's file types (methods/ggml_mix.py), the
tensors named by the roles the model's Arch gives its modules. Weights already held as ggml blocks
(`lowbit quantize --method q4_k_m`), as affine integer groups that are exactly a legacy ggml type
(an int4 g32 symmetric weight is Q4_0), or as ternary codes with one float16 scale (BitNet b1.58: TQ1_0 /
TQ2_0 blocks whose d is that scale), are copied as they are; a quantised weight of another scheme is
refused unless re-rounding is asked for; float weights are quantised here. q and k rows are permuted
from Hugging Face's rotate-half layout to the interleaved pairs llama.cpp's rope expects (what
convert_hf_to_gguf.py does).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import Exporter, quantized_weights, register_exporter
from lowbit.io.atomic import atomic_output
from lowbit.io.gguf_rope import rope_for_export
from lowbit.io.hf_folder import source_name
from lowbit.io.progress import tensor_bar
from lowbit.kernels.ggml_search import searches
from lowbit.methods.ggml_mix import FILE_TYPES, file_type, tensor_type
from lowbit.pipeline.arch import Arch, block_list, describe
from lowbit.weights.ggml import TERNARY_TYPES, GGMLTensor, ggml_from_ternary, quantize_ggml, retype_ternary
from lowbit.weights.ggml.affine import ggml_from_affine
from lowbit.weights.ggml.block import QK_K
from lowbit.weights.ternary import TernaryWeight

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
    rope_for_export(config, _rope_theta(config), _head_dim(config))   # refuses a scaling it cannot write


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
    keys, tensors = rope_for_export(config, _rope_theta(config), _head_dim(config))
    for key, value in keys.items():
        (writer.add_string if isinstance(value, str) else writer.add_float32)(f"llama.{key}", value)
    for tname, data in tensors.items():
        writer.add_tensor(tname, data)


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


# ----------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------
def _as_ggml(weight) -> GGMLTensor | None:
    if isinstance(weight, TernaryWeight):
        return ggml_from_ternary(weight) if weight.shape[1] % QK_K == 0 else None
    return weight if isinstance(weight, GGMLTensor) else ggml_from_affine(weight)


def _source(model: nn.Module, hf: str, weights: dict):
    """A weight as ggml blocks when held so, else as float32 (a float module, or a weight to re-round)."""
    held = weights.get(hf)
    if held is not None:
        return held
    module = model.get_submodule(hf)
    return module.weight.detach().float()


def _permute(source, n_head: int):
    idx = rope_permutation(source.shape[0], n_head)
    if isinstance(source, GGMLTensor):
        return GGMLTensor(source.data[idx].contiguous(), source.type, source.shape, source.dtype)
    return source[idx]


def _is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or getattr(out, "weight", None) is model.get_input_embeddings().weight


def tensor_names(model: nn.Module, arch: Arch) -> list[tuple[str, str]]:
    """(Hugging Face module, GGUF tensor name) of every tensor, in llama.cpp's order."""
    by_role = {role: name for name, role in arch.globals.items()}
    path, blocks = block_list(model, arch)
    names = [(by_role["token_embd"], "token_embd.weight")]
    for i in range(len(blocks)):
        names += [(f"{path}.{i}.{suffix}", f"blk.{i}.{role}.weight") for suffix, role in arch.roles.items()]
    names.append((by_role["output_norm"], "output_norm.weight"))
    if not _is_tied(model):
        names.append((by_role["output"], "output.weight"))
    return names


def gguf_names(model: nn.Module) -> dict[str, str]:
    """{Hugging Face module name: GGUF tensor name} of every tensor the GGUF file of `model` holds."""
    return dict(tensor_names(model, describe(model)))


def _stored(name: str, source, target: str, importance, search: bool, held: str) -> tuple[np.ndarray, str]:
    """(uint8 array as GGUF stores it, ggml type): held blocks are copied, float weights quantised.
    held: what to do with held blocks of another type than `target`: "keep", "reround" or "refuse"."""
    if isinstance(source, GGMLTensor):
        if source.type in TERNARY_TYPES and target in TERNARY_TYPES:
            source = retype_ternary(source, target)      # the same d and codes in the other layout
        if source.type == target or held == "keep":
            return source.data.numpy(), source.type
        if held == "refuse":
            raise LowbitError(f"{name} holds {source.type} blocks but the file type asked for stores it as {target}; "
                              "export without --type to keep the model's own types, or pass --requantize")
        source = source.dequantize().float()
    if source.dim() == 1:
        return quantize_ggml(source.reshape(1, -1), "F32").reshape(-1), "F32"
    with searches():   # the compiled scale searches when the kernels load (lowbit.kernels.ggml_search)
        return quantize_ggml(source, target, importance, search), target


def gguf_tensors(model, ftype: str, weights: dict | None = None, imatrix: dict | None = None, search: bool = True,
                 held: str = "keep"):
    """(GGUF name, uint8 array, ggml type) for every tensor of a Llama model, in llama.cpp's order.
    weights: {module: GGMLTensor held, or a float tensor to round}; held: where the file type would choose
    another type than a held block's, "keep" the block, "reround" it from its values, or "refuse"."""
    config, arch = model.config, describe(model)
    n_layers, n_heads, n_kv = config.num_hidden_layers, config.num_attention_heads, _n_kv_heads(config)
    tied = _is_tied(model)
    weights = weights or {}
    for hf, name in tensor_names(model, arch):
        source = _source(model, hf, weights)
        role = name.split(".")[-2]
        if role in ("attn_q", "attn_k"):
            source = _permute(source, n_heads if role == "attn_q" else n_kv)
        target = tensor_type(ftype, name, n_layers, source.shape[-1], n_heads // n_kv, tied, imatrix is not None)
        importance = None if imatrix is None else imatrix.get(hf)
        yield (name, *_stored(name, source, target, importance, search, held))


# ----------------------------------------------------------------------------------------------------
# The file type
# ----------------------------------------------------------------------------------------------------
# The file type named after a block type, for models holding one type throughout.
_FILE_TYPE_OF_BLOCK = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0",
                       "Q2_K": "q2_k", "Q3_K": "q3_k_s", "Q4_K": "q4_k_s", "Q5_K": "q5_k_s", "Q6_K": "q6_k",
                       "TQ1_0": "tq1_0", "TQ2_0": "tq2_0"}
DEFAULT_FILE_TYPE = "q4_k_m"


def infer_file_type(model: nn.Module, weights: dict) -> str:
    """The llama.cpp file type a quantised model already is: its recipe's (q4_k_m ...), else that of
    the block type most of its weights hold; a float model gets DEFAULT_FILE_TYPE."""
    recipe = getattr(model, "lowbit_recipe", None)
    if recipe is not None and recipe.default.name in FILE_TYPES:
        return recipe.default.name
    held = Counter(w.type for w in weights.values() if isinstance(w, GGMLTensor))
    if held:
        return _FILE_TYPE_OF_BLOCK.get(held.most_common(1)[0][0], DEFAULT_FILE_TYPE)
    return DEFAULT_FILE_TYPE


# ----------------------------------------------------------------------------------------------------
# The exporter
# ----------------------------------------------------------------------------------------------------
class GGUFExporter(Exporter):
    """llama.cpp's GGUF. Holds ggml blocks of every type, and affine weights that are a legacy type
    exactly; a quantised weight of any other scheme is re-rounded by the file type's rules only when
    asked (requantize)."""

    name = "gguf"

    def problem(self, weight) -> str | None:
        if _as_ggml(weight) is not None:
            return None
        return ("GGUF holds ggml blocks, int4/int5/int8 g32 symmetric or uint4/uint5 g32 weights with fp16 "
                "scales as Q4_0/Q5_0/Q8_0/Q4_1/Q5_1, and ternary weights with rows of a multiple of 256 as TQ1_0/TQ2_0")

    def prepare(self, model: nn.Module, requantize: bool = False) -> tuple[dict, list[str]]:
        weights, redone = {}, []
        for name, w in quantized_weights(model).items():
            blocks = _as_ggml(w)
            if blocks is not None:
                weights[name] = blocks
            elif requantize:
                weights[name] = w.dequantize().float()      # rounded again by the file type's rules
                redone.append(name)
            else:
                raise LowbitError(self.refusal(name, w, "pass --requantize to round it again by the file type's rules"))
        return weights, redone

    def write(self, model, weights, out, tokenizer=None, type: str | None = None, imatrix: dict | None = None,
              search: bool = True, tokenizer_pre: str | None = None, name: str | None = None,
              requantize: bool = False, progress: bool = False, **_options) -> Path:
        from gguf import GGMLQuantizationType, GGUFWriter

        if tokenizer is None:
            raise LowbitError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
        _check_llama(model.config)
        ftype = file_type(type) if type else infer_file_type(model, weights)
        # without a file type the model's own types are kept; an explicit one must match, or re-round them
        held = "keep" if type is None else "reround" if requantize else "refuse"
        out = Path(out)
        with atomic_output(out, folder=False) as tmp:
            writer = GGUFWriter(str(tmp), "llama")
            _write_hparams(writer, model.config, ftype, name or source_name(model))
            _write_tokenizer(writer, tokenizer, model.config.vocab_size, tokenizer_pre)
            with torch.no_grad():
                tensors = gguf_tensors(model, ftype, weights, imatrix, search, held)
                # rounding tensor by tensor is the long part (minutes for a large model): show it
                total = len(tensor_names(model, describe(model)))
                with tensor_bar(total, "GGUF tensors", progress) as bar:
                    for tname, data, stored in tensors:
                        writer.add_tensor(tname, data, raw_dtype=GGMLQuantizationType[stored])
                        bar.update()
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return out


EXPORTER = register_exporter(GGUFExporter())


def export_gguf(model, out_path, tokenizer=None, type: str | None = None, imatrix: dict | None = None,
                search: bool = True, tokenizer_pre: str | None = None, name: str | None = None,
                requantize: bool = False, progress: bool = False) -> Path:
    """Write `model` (a Llama model, or a path to one) as a GGUF file of llama.cpp file type `type`
    ("Q4_K_M", "Q8_0", "F16", ...; None: the type the model was quantised to, Q4_K_M for a float model).

    imatrix: optional {HF Linear name: mean squared input activation per column} (llama.cpp's imatrix).
    search:  False quantises exactly as llama-quantize would; True searches further (lowbit.weights.ggml).
    progress: a bar over the tensors on stderr.
    """
    if isinstance(model, (str, os.PathLike)):
        from lowbit.api import load_model
        model, loaded_tok = load_model(model)
        tokenizer = tokenizer or loaded_tok
    return EXPORTER.export(model, out_path, tokenizer, requantize, type=type, imatrix=imatrix, search=search,
                           tokenizer_pre=tokenizer_pre, name=name, progress=progress)
