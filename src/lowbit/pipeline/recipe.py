"""A recipe maps Linear names to method configs, so mixed precision and skip lists are data."""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch

from lowbit.methods.base import MethodConfig, method_from_dict

# Kept in full precision unless a recipe says otherwise: the output head is small next to the blocks
# and its errors land directly on the logits. (Embeddings are not Linears and are never quantised here.)
DEFAULT_SKIP = ("lm_head", "*.lm_head", "embed_out", "output")


@dataclass
class Recipe:
    default: MethodConfig
    overrides: list = field(default_factory=list)   # [(pattern, config or None)]; first match wins
    skip: tuple = DEFAULT_SKIP

    def config_for(self, name: str) -> MethodConfig | None:
        for pattern, config in self.overrides:
            if fnmatch(name, pattern):
                return config
        if any(fnmatch(name, p) for p in self.skip):
            return None
        return self.default

    def to_dict(self) -> dict:
        return {"default": self.default.to_dict(),
                "overrides": [[p, None if c is None else c.to_dict()] for p, c in self.overrides],
                "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(method_from_dict(d["default"]),
                   [(p, None if c is None else method_from_dict(c)) for p, c in d.get("overrides", [])],
                   tuple(d.get("skip", DEFAULT_SKIP)))


def as_recipe(config_or_recipe) -> Recipe:
    if isinstance(config_or_recipe, Recipe):
        return config_or_recipe
    if isinstance(config_or_recipe, MethodConfig):
        return Recipe(config_or_recipe)
    from lowbit.methods import parse_method

    if isinstance(config_or_recipe, str):
        return Recipe(parse_method(config_or_recipe))
    raise TypeError(f"expected a method config, a Recipe or a method name, got {type(config_or_recipe).__name__}")
