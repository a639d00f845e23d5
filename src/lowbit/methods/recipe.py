"""A recipe maps Linear names to method configs, so mixed precision and skip lists are data."""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch

from lowbit.errors import LowbitError
from lowbit.methods.base import MethodConfig, method_from_dict, parse_method

# Kept in full precision unless a recipe says otherwise: the output head is small next to the blocks
# and its errors land directly on the logits. (Embeddings are not Linears and are never quantised here.)
DEFAULT_SKIP = ("lm_head", "*.lm_head", "embed_out", "output")


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
        self.overrides = [(p, None if c is None else _config(c)) for p, c in self.overrides]
        self.skip = tuple(self.skip)

    def configs(self) -> list[MethodConfig]:
        """Every distinct config the recipe uses, default first."""
        out = [self.default]
        for _, c in self.overrides:
            if c is not None and c not in out:
                out.append(c)
        return out

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
        if not isinstance(d, dict) or "default" not in d:
            raise LowbitError("a recipe must be a dict with a 'default' method config")
        return cls(method_from_dict(d["default"]),
                   [(p, None if c is None else method_from_dict(c)) for p, c in d.get("overrides", [])],
                   tuple(d.get("skip", DEFAULT_SKIP)))


def _config(c) -> MethodConfig:
    if isinstance(c, MethodConfig):
        return c
    if isinstance(c, str):
        return parse_method(c)
    raise LowbitError(f"expected a method config or a method name, got {type(c).__name__}")


def as_recipe(config_or_recipe) -> Recipe:
    if isinstance(config_or_recipe, Recipe):
        return config_or_recipe
    if isinstance(config_or_recipe, MethodConfig):
        return Recipe(config_or_recipe)
    if isinstance(config_or_recipe, str):
        return Recipe(parse_method(config_or_recipe))
    raise LowbitError(f"expected a method config, a Recipe or a method name, got {type(config_or_recipe).__name__}")
