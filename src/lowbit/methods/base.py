"""Method configs and their registry.

A method is a frozen dataclass (its settings) with `quantize_weight(weight, stats) -> QuantizedTensor`,
which calls the method's pure tensor function. `required_stats` says what the pipeline must gather.
Short names ("rtn-int4-g128", "gptq-int3-g128-actorder") are shared by the CLI, the API and reports.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch

from lowbit.core import QuantizedTensor
from lowbit.errors import LowbitError
from lowbit.methods.stats import LayerStats

METHODS: dict[str, type["MethodConfig"]] = {}


@dataclass(frozen=True)
class MethodConfig:
    name: ClassVar[str] = ""
    required_stats: ClassVar[tuple[str, ...]] = ()
    # Whether sub-layers of a block are quantised one group at a time, each seeing the outputs of the
    # already-quantised groups before it (GPTQ's "true sequential"). Costs one pass per group.
    sequential: ClassVar[bool] = False

    def quantize_weight(self, weight: torch.Tensor, stats: LayerStats | None) -> QuantizedTensor:
        raise NotImplementedError

    def short_name(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_short_name(cls, rest: list[str]) -> "MethodConfig":
        """Build from the dash-separated words after the method name, e.g. ["int4", "g128"]."""
        raise LowbitError(f"method {cls.name!r} takes no options in its short name")


def register_method(cls: type[MethodConfig]) -> type[MethodConfig]:
    METHODS[cls.name] = cls
    return cls


def method_from_dict(d: dict) -> MethodConfig:
    name = d.get("method")
    if name not in METHODS:
        raise LowbitError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name].from_dict({k: v for k, v in d.items() if k != "method"})


def parse_method(short: str) -> MethodConfig:
    """'rtn-int4-g128' -> RTN(bits=4, group_size=128). The method name is the first dash-separated word
    (or the whole string, for names such as 'nf4' or 'q4_k_m' registered whole)."""
    short = short.strip().lower()
    if short in METHODS:
        return METHODS[short].from_short_name([])
    words = short.split("-")
    # the longest leading words that name a method, so dashed names ("llm-int8-t4") take options too
    for k in range(len(words) - 1, 0, -1):
        head = "-".join(words[:k])
        if head in METHODS:
            return METHODS[head].from_short_name(words[k:])
    raise LowbitError(f"unknown method {short!r}; known methods: {', '.join(sorted(METHODS))}")


def parse_int_scheme(words: list[str]) -> dict:
    """Common words of integer weight schemes: int4 / uint4, g128, asym|sym. Returns config kwargs."""
    out: dict = {}
    for w in words:
        if w.startswith("uint") and w[4:].isdigit():
            out["bits"] = int(w[4:])
            out["symmetric"] = False
        elif w.startswith("int") and w[3:].isdigit():
            out["bits"] = int(w[3:])
        elif w.startswith("g") and w[1:].isdigit():
            out["group_size"] = int(w[1:])
        elif w in ("asym", "sym"):
            out["symmetric"] = w == "sym"
        else:
            raise LowbitError(f"unrecognised word {w!r} in method name (expected intN, gN, asym or sym)")
    return out


def int_scheme_name(bits: int, group_size: int | None, symmetric: bool) -> str:
    return f"int{bits}" + (f"-g{group_size}" if group_size else "") + ("" if symmetric else "-asym")
