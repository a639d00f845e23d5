"""Architectures described as data: where the blocks are, which Linears share an input, which norm
precedes them. A few lines per family; no copied model code, no graph tracing.

Names are relative to one block. `groups` lists the sub-layers in execution order, each a tuple of
Linears that read the same input (quantised together under "true sequential"); `norms` names the norm
whose output feeds a group (where input scalings can be folded); `prev` names the op whose output is a
group's input when it is another Linear (AWQ folds o_proj scales into v_proj, down_proj into up_proj).
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
    norm_offset: float = 0.0                       # Gemma's RMSNorm multiplies by (1 + weight)
    causal: bool = True


_LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_LLAMA_NORMS = {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm"}
_LLAMA_PREV = {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}
_DECODER_PATHS = ("model.layers", "layers", "model.language_model.layers")


def _llama_like(family: str, norm_offset: float = 0.0) -> Arch:
    return Arch(family, _DECODER_PATHS, _LLAMA_GROUPS, _LLAMA_NORMS, _LLAMA_PREV, norm_offset)


ARCHES: dict[str, Arch] = {
    **{name: _llama_like(name) for name in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe")},
    "gemma": _llama_like("gemma", 1.0),
    "gemma2": _llama_like("gemma2", 1.0),
    "phi3": Arch("phi3", _DECODER_PATHS,
                 (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
                 {"self_attn.qkv_proj": "input_layernorm", "mlp.gate_up_proj": "post_attention_layernorm"}),
    "gpt2": Arch("gpt2", ("transformer.h", "h"),
                 (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
                 {"attn.c_attn": "ln_1", "mlp.c_fc": "ln_2"}, {"mlp.c_proj": "mlp.c_fc"}),
    "opt": Arch("opt", ("model.decoder.layers", "decoder.layers"),
                (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                 ("fc1",), ("fc2",)),
                {"self_attn.q_proj": "self_attn_layer_norm", "fc1": "final_layer_norm"},
                {"self_attn.out_proj": "self_attn.v_proj", "fc2": "fc1"}),
    # Encoders are post-norm: no norm feeds the Linears directly, so nothing is folded there.
    **{name: Arch(name, ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
                  (("attention.self.query", "attention.self.key", "attention.self.value"),
                   ("attention.output.dense",), ("intermediate.dense",), ("output.dense",)), causal=False)
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


def sequential_groups(arch: Arch, linear_names: list[str]) -> list[list[str]]:
    """The arch's groups restricted to Linears present, then any Linears it does not name, one group."""
    present = set(linear_names)
    groups = [[n for n in g if n in present] for g in arch.groups]
    groups = [g for g in groups if g]
    named = {n for g in groups for n in g}
    rest = [n for n in linear_names if n not in named]
    return groups + ([rest] if rest else [])
