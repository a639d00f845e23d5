"""A recipe maps Linear names to method configs, so mixed precision and skip lists are data."""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch

from lowbit.errors import LowbitError
from lowbit.methods.base import MethodConfig, method_from_dict, parse_method

# Kept in full precision unless a recipe says otherwise: the output head is small next to the blocks
# and its errors land directly on the logits. (Embeddings are not Linears and are never quantised here.)
# Mixture-of-experts router gates too: tiny, they choose the experts, and serving engines build them
# unquantised (vLLM's qwen2_moe.py: gate with quant_config=None, shared_expert_gate a plain Linear), so a
# quantised one makes a checkpoint they cannot load; a [1, H] gate fills no packed GPTQ/AWQ word either.
DEFAULT_SKIP = ("lm_head", "*.lm_head", "embed_out", "output", "*.mlp.gate", "*.shared_expert_gate")


@dataclass
class Recipe:
    """default: the config of every Linear no pattern names; overrides: [(fnmatch pattern, config or None
    for full precision)], first match wins; skip: patterns kept in full precision. Configs may be given
    as short names ("rtn-int8")."""

    default: MethodConfig
    overrides: list = field(default_factory=list)
    skip: tuple = DEFAULT_SKIP

    def __post_init__(self):
        self.default = _config(self.default)
        if not isinstance(self.overrides, (list, tuple)):
            raise LowbitError(f"recipe overrides must be a list of (pattern, config) pairs, got {type(self.overrides).__name__}")
        self.overrides = [_override(o) for o in self.overrides]
        if isinstance(self.skip, str) or not isinstance(self.skip, (list, tuple)) or \
                not all(isinstance(p, str) for p in self.skip):
            raise LowbitError(f"recipe skip must be a list of name patterns, got {self.skip!r}")
        self.skip = tuple(self.skip)

    def config_for(self, name: str) -> MethodConfig | None:
        for pattern, config in self.overrides:
            if fnmatch(name, pattern):
                return config
        if any(fnmatch(name, p) for p in self.skip):
            return None
        return self.default

    def configs(self) -> list[MethodConfig]:
        """Every config this recipe may apply: the default, then each override's (full precision left out)."""
        return [self.default] + [c for _, c in self.overrides if c is not None]

    def to_dict(self) -> dict:
        return {"default": self.default.to_dict(),
                "overrides": [[p, None if c is None else c.to_dict()] for p, c in self.overrides],
                "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict) or "default" not in d:
            raise LowbitError("a recipe must be a dict with a 'default' method config")
        overrides = d.get("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, list) and len(o) == 2 for o in overrides):
            raise LowbitError("recipe overrides must be a list of [pattern, config] pairs")
        return cls(_config(d["default"]), [(p, None if c is None else _config(c)) for p, c in overrides],
                   d.get("skip", list(DEFAULT_SKIP)))


def _config(c) -> MethodConfig:
    """A config from a config, a short name or a saved dict."""
    if isinstance(c, MethodConfig):
        return c
    if isinstance(c, str):
        return parse_method(c)
    if isinstance(c, dict):
        return method_from_dict(c)
    raise LowbitError(f"expected a method config or a method name, got {type(c).__name__}")


def _override(o) -> tuple[str, MethodConfig | None]:
    if not isinstance(o, (list, tuple)) or len(o) != 2 or not isinstance(o[0], str):
        raise LowbitError(f"a recipe override is a (name pattern, config or None) pair, got {o!r}")
    return o[0], None if o[1] is None else _config(o[1])


def as_recipe(config_or_recipe) -> Recipe:
    if isinstance(config_or_recipe, Recipe):
        return config_or_recipe
    if isinstance(config_or_recipe, MethodConfig):
        return Recipe(config_or_recipe)
    if isinstance(config_or_recipe, str):
        return Recipe(parse_method(config_or_recipe))
    raise LowbitError(f"expected a method config, a Recipe or a method name, got {type(config_or_recipe).__name__}")
