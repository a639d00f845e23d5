"""llama.cpp's file types ("mixes"): which ggml type each tensor of a Llama model gets.

Q4_K_M is not "Q4_K everywhere": llama-quantize (llama_tensor_get_type_impl in llama-quant.cpp) gives
the output matrix Q6_K, and a share of the attention-value and feed-forward-down matrices more bits.
Here those rules are data (RULES) read by one small function (role_type), for dense models; the rules
for Falcon, mixture-of-experts and the 70B special case are left out.

Rules are keyed by GGUF's tensor roles ("attn_v", "ffn_down", "output"); the model's Arch says which
role each Linear plays (the pipeline passes it in LayerInfo). `tensor_type` reads GGUF tensor names
("blk.3.attn_v.weight"), for the GGUF writer.
"""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.methods.base import LayerInfo, MethodConfig, register_method
from lowbit.methods.ggml_quant import GGML_WORDS, GGMLConfigMixin, GGMLQuant
from lowbit.weights.ggml import block_size, fit_type


@dataclass(frozen=True)
class FileType:
    file_type: int      # general.file_type (llama_ftype)
    default: str        # ggml type of the tensors no rule names


FILE_TYPES: dict[str, FileType] = {
    "f32": FileType(0, "F32"), "f16": FileType(1, "F16"), "bf16": FileType(32, "BF16"),
    "q4_0": FileType(2, "Q4_0"), "q4_1": FileType(3, "Q4_1"), "q8_0": FileType(7, "Q8_0"),
    "q5_0": FileType(8, "Q5_0"), "q5_1": FileType(9, "Q5_1"), "q2_k": FileType(10, "Q2_K"),
    "q3_k_s": FileType(11, "Q3_K"), "q3_k_m": FileType(12, "Q3_K"), "q3_k_l": FileType(13, "Q3_K"),
    "q4_k_s": FileType(14, "Q4_K"), "q4_k_m": FileType(15, "Q4_K"), "q5_k_s": FileType(16, "Q5_K"),
    "q5_k_m": FileType(17, "Q5_K"), "q6_k": FileType(18, "Q6_K"),
    "tq1_0": FileType(36, "TQ1_0"), "tq2_0": FileType(37, "TQ2_0"),
}
# llama.cpp gives an untied token embedding another type in a few file types (the ternary ones: Q4_K).
EMBEDDING_TYPES = {"tq1_0": "Q4_K", "tq2_0": "Q4_K"}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's pick of layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _more_bits(to: str):
    return lambda i, n, gqa: to if use_more_bits(i, n) else None


# Per file type, per tensor role: a type, or a function (layer index, layer count, n_head/n_kv_head)
# returning a type or None (= the default). For dense Llama models the running counters llama.cpp keeps
# (i_attention_wv, i_ffn_down) equal the layer index, since every layer has one of each.
RULES: dict[str, dict] = {
    "q2_k": {"attn_v": lambda i, n, gqa: "Q4_K" if gqa >= 4 else "Q3_K", "ffn_down": "Q3_K",
             "attn_output": "Q3_K"},
    "q3_k_m": {"attn_v": lambda i, n, gqa: "Q5_K" if i < 2 else "Q4_K",
               "ffn_down": lambda i, n, gqa: "Q5_K" if i < n // 16 else "Q4_K", "attn_output": "Q4_K"},
    "q3_k_l": {"attn_v": "Q5_K", "ffn_down": "Q5_K", "attn_output": "Q5_K"},
    "q4_k_s": {"attn_v": lambda i, n, gqa: "Q5_K" if i < 4 else None,
               "ffn_down": lambda i, n, gqa: "Q5_K" if i < n // 8 else None},
    "q4_k_m": {"attn_v": _more_bits("Q6_K"), "ffn_down": _more_bits("Q6_K")},
    "q5_k_m": {"attn_v": _more_bits("Q6_K"), "ffn_down": _more_bits("Q6_K")},
}
# With an importance matrix, llama.cpp protects the first eighth of ffn_down in Q4_0 / Q5_0 files.
IMATRIX_RULES: dict[str, dict] = {
    "q4_0": {"ffn_down": lambda i, n, gqa: "Q4_1" if i < n // 8 else None},
    "q5_0": {"ffn_down": lambda i, n, gqa: "Q5_1" if i < n // 8 else None},
}

def split_name(name: str) -> tuple[str, int | None]:
    """'blk.3.attn_v.weight' -> ('attn_v', 3); 'output.weight' -> ('output', None)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 3 and parts[1].isdigit():
        return parts[2], int(parts[1])
    return parts[0], None


def file_type(name: str) -> str:
    key = str(name).lower()
    if key not in FILE_TYPES:
        raise LowbitError(f"unknown GGUF file type {name!r}; known: {', '.join(t.upper() for t in FILE_TYPES)}")
    return key


def _output_type(default: str, n_cols: int | None) -> str:
    """The output matrix (or the tied embedding): Q6_K, unless the file is Q8_0 or rows do not fit."""
    if n_cols is not None and n_cols % block_size(default):
        return "Q8_0"
    return default if default == "Q8_0" else "Q6_K"


def _rule_type(ftype: str, role: str, layer: int | None, n_layers: int, n_gqa: int, imatrix: bool) -> str | None:
    rules = {**RULES.get(ftype, {}), **(IMATRIX_RULES.get(ftype, {}) if imatrix else {})}
    rule = rules.get(role) if layer is not None else None
    return rule(layer, n_layers, n_gqa) if callable(rule) else rule


def tensor_type(ftype: str, name: str, n_layers: int, n_cols: int | None = None, n_gqa: int = 1,
                tied_embeddings: bool = False, imatrix: bool = False) -> str:
    """The ggml type llama-quantize gives tensor `name` (GGUF naming) of a dense model."""
    role, layer = split_name(name)
    if role.endswith("_norm") or not name.endswith(".weight"):
        return "F32"     # norms and biases are never quantised
    return role_type(ftype, role, layer, n_layers, n_cols, n_gqa, tied_embeddings, imatrix)


def role_type(ftype: str, role: str | None, layer: int | None, n_layers: int, n_cols: int | None = None,
              n_gqa: int = 1, tied_embeddings: bool = False, imatrix: bool = False) -> str:
    """The ggml type of a weight matrix playing `role` in block `layer` (None outside the blocks)."""
    key = file_type(ftype)
    default = FILE_TYPES[key].default
    if default in ("F32", "F16", "BF16"):
        return default
    if role == "output" or (role == "token_embd" and tied_embeddings):
        chosen = _output_type(default, n_cols)
    elif role == "token_embd" and key in EMBEDDING_TYPES:
        chosen = EMBEDDING_TYPES[key]
    else:
        chosen = _rule_type(key, role, layer, n_layers, n_gqa, imatrix) or default
    return chosen if n_cols is None else fit_type(chosen, n_cols)


@dataclass(frozen=True)
class GGMLMix(GGMLConfigMixin, MethodConfig):
    """A llama.cpp file type: the per-tensor type is chosen by `for_layer` (the pipeline asks before
    quantising each Linear). Registered once per file type: 'q4_k_m', 'q4_k_m-imatrix', 'q8_0-ref' ..."""

    words = GGML_WORDS
    imatrix: bool = False
    search: bool = True

    def layer_config(self, gguf_tensor: str, n_layers: int, n_cols: int | None = None, n_gqa: int = 1,
                     tied_embeddings: bool = False) -> GGMLQuant:
        t = tensor_type(self.name, gguf_tensor, n_layers, n_cols, n_gqa, tied_embeddings, self.imatrix)
        return GGMLQuant(type=t, imatrix=self.imatrix, search=self.search)

    def for_layer(self, layer: LayerInfo) -> GGMLQuant:
        """The concrete per-tensor config for a Linear of the role and block the Arch gives it."""
        t = role_type(self.name, layer.role, layer.layer, layer.n_layers, None, layer.n_gqa, False, self.imatrix)
        return GGMLQuant(type=t, imatrix=self.imatrix, search=self.search)

    def quantize_weight(self, weight, stats=None):
        """Without a layer name: the file type's default type (as llama-quantize --pure)."""
        return GGMLQuant(type=FILE_TYPES[self.name].default, imatrix=self.imatrix,
                         search=self.search).quantize_weight(weight, stats)


def _register_file_types() -> dict[str, type]:
    made = {}
    for key in FILE_TYPES:
        if FILE_TYPES[key].default in ("F32", "F16", "BF16"):
            continue
        doc = f"llama.cpp file type {key.upper()} (see GGMLMix)."
        made[key] = register_method(dataclass(frozen=True)(type(f"GGUF_{key.upper()}", (GGMLMix,),
                                                                {"name": key, "__doc__": doc})))
    return made


MIX_CONFIGS = _register_file_types()
