"""Architectures described as data: where the blocks are, which Linears share an input, which norm
precedes them. A few lines per family; no copied model code, no graph tracing.

Names are relative to one block. `groups` lists the sub-layers in execution order, each a tuple of
Linears that read the same input (quantised together under "true sequential"); `norms` names the norm
whose output feeds a group (where input scalings can be folded); `prev` names the op whose output is a
group's input when it is another Linear (AWQ folds o_proj scales into v_proj, down_proj into up_proj);
`linear_prev` lists the groups whose `prev` reaches them through linear operations only (attention is
linear in V, a gated MLP in its up branch), the others only through an activation, which must then be
homogeneous (ReLU) for a fold. `roles` gives each module's role in GGUF's vocabulary (attn_q ...
ffn_down, attn_norm, ffn_norm) and `globals` the same for modules outside the blocks: methods see roles
(LayerInfo), exporters name tensors by them. These tables are the only place layer names appear.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Arch:
    family: str
    block_paths: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...] = ()
    norms: dict = field(default_factory=dict)      # first Linear of a group -> norm module name
    prev: dict = field(default_factory=dict)       # first Linear of a group -> preceding Linear
    linear_prev: tuple = ()                        # groups whose `prev` reaches them linearly
    roles: dict = field(default_factory=dict)      # module name in a block -> GGUF role
    globals: dict = field(default_factory=dict)    # module name in the model -> GGUF role
    norm_offset: float = 0.0                       # Gemma's RMSNorm multiplies by (1 + weight)
    causal: bool = True


_LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_LLAMA_NORMS = {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm"}
_LLAMA_PREV = {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}
_LLAMA_ROLES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_LLAMA_GLOBALS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_DECODER_PATHS = ("model.layers", "layers", "model.language_model.layers")


def _llama_like(family: str, norm_offset: float = 0.0, norms: dict = _LLAMA_NORMS) -> Arch:
    return Arch(family, _DECODER_PATHS, _LLAMA_GROUPS, norms, _LLAMA_PREV, tuple(_LLAMA_PREV), _LLAMA_ROLES,
                _LLAMA_GLOBALS, norm_offset)


# Gemma-2/3 wrap attention and MLP in "sandwich" norms: post_attention_layernorm normalises the attention
# *output*; the MLP reads pre_feedforward_layernorm.
_GEMMA2_NORMS = {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "pre_feedforward_layernorm"}
_PHI3_GROUPS = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))
_PHI3_ROLES = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_OPT_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_BERT_GROUPS = (("attention.self.query", "attention.self.key", "attention.self.value"),
                ("attention.output.dense",), ("intermediate.dense",), ("output.dense",))
_BERT_ROLES = {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
               "attention.output.dense": "attn_output", "intermediate.dense": "ffn_up", "output.dense": "ffn_down"}

ARCHES: dict[str, Arch] = {
    **{name: _llama_like(name) for name in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe")},
    "gemma": _llama_like("gemma", 1.0),
    "gemma2": _llama_like("gemma2", 1.0, _GEMMA2_NORMS),
    "phi3": Arch("phi3", _DECODER_PATHS, _PHI3_GROUPS,
                 {"self_attn.qkv_proj": "input_layernorm", "mlp.gate_up_proj": "post_attention_layernorm"},
                 roles=_PHI3_ROLES, globals=_LLAMA_GLOBALS),
    "gpt2": Arch("gpt2", ("transformer.h", "h"),
                 (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
                 {"attn.c_attn": "ln_1", "mlp.c_fc": "ln_2"}, {"mlp.c_proj": "mlp.c_fc"},
                 roles={"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up",
                        "mlp.c_proj": "ffn_down", "ln_1": "attn_norm", "ln_2": "ffn_norm"},
                 globals={"transformer.wte": "token_embd", "transformer.ln_f": "output_norm", "lm_head": "output"}),
    "opt": Arch("opt", ("model.decoder.layers", "decoder.layers"),
                (_OPT_ATTN, ("self_attn.out_proj",), ("fc1",), ("fc2",)),
                {"self_attn.q_proj": "self_attn_layer_norm", "fc1": "final_layer_norm"},
                {"self_attn.out_proj": "self_attn.v_proj", "fc2": "fc1"}, ("self_attn.out_proj",),
                roles={**dict(zip(_OPT_ATTN, ("attn_q", "attn_k", "attn_v"))), "self_attn.out_proj": "attn_output",
                       "fc1": "ffn_up", "fc2": "ffn_down", "self_attn_layer_norm": "attn_norm",
                       "final_layer_norm": "ffn_norm"},
                globals={"model.decoder.embed_tokens": "token_embd", "lm_head": "output"}),
    # Encoders are post-norm: no norm feeds the Linears directly, so nothing is folded there.
    **{name: Arch(name, ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"), _BERT_GROUPS,
                  roles=_BERT_ROLES, causal=False)
       for name in ("bert", "roberta", "xlm-roberta")},
}


def _get(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _generic_arch(model: nn.Module, family: str) -> Arch | None:
    """Fallback for unknown families: the longest ModuleList whose entries hold Linears."""
    best_name, best_len = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best_len:
            if any(isinstance(m, nn.Linear) for m in mod[0].modules()):
                best_name, best_len = name, len(mod)
    return Arch(family, (best_name,), causal=True) if best_name else None


def describe(model: nn.Module) -> Arch:
    family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__.lower()
    arch = ARCHES.get(family) or _generic_arch(model, family)
    if arch is None:
        raise LowbitError(f"unsupported architecture {family!r}: no repeated blocks of Linear layers found")
    return arch


def block_list(model: nn.Module, arch: Arch) -> tuple[str, nn.ModuleList]:
    for path in arch.block_paths:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return path, blocks
    raise LowbitError(f"unsupported architecture {arch.family!r}: no decoder blocks at {', '.join(arch.block_paths)}")


def shared_input_groups(model: nn.Module) -> list[list[str]]:
    """Full names of every group of two or more Linears that read one input (q/k/v, gate/up)."""
    arch = describe(model)
    path, blocks = block_list(model, arch)
    return [[f"{path}.{i}.{n}" for n in g] for i in range(len(blocks)) for g in arch.groups if len(g) > 1]


def sequential_groups(arch: Arch, linear_names: list[str]) -> list[list[str]]:
    """The arch's groups restricted to Linears present, then any Linears it does not name, one group."""
    present = set(linear_names)
    groups = [[n for n in g if n in present] for g in arch.groups]
    groups = [g for g in groups if g]
    named = {n for g in groups for n in g}
    rest = [n for n in linear_names if n not in named]
    return groups + ([rest] if rest else [])
