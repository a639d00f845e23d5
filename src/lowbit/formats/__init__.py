"""Number formats as values: exact encode/decode, round-to-nearest-even, saturation, value tables.

Formats are found by name through a registry, so the CLI, the API and saved files share one vocabulary:
    get_format("fp8_e4m3").encode(x)      get_format("int4").values()      list_formats()
"""
from __future__ import annotations

from typing import Callable

from lowbit.errors import LowbitError
from lowbit.formats.base import NumberFormat
from lowbit.formats.codebook import BNB_FP4_LEVELS, NF4_LEVELS, TERNARY_LEVELS, CodebookFormat
from lowbit.formats.integer import IntFormat
from lowbit.formats.minifloat import FloatFormat
from lowbit.formats.rounding import round_mantissa, round_to_float
from lowbit.formats.scale import E8M0Format

_FACTORIES: dict[str, Callable[[], NumberFormat]] = {}
_ALIASES: dict[str, str] = {}
_CACHE: dict[str, NumberFormat] = {}


def register_format(name: str, factory: Callable[[], NumberFormat], aliases: tuple[str, ...] = ()) -> None:
    _FACTORIES[name] = factory
    for alias in aliases:
        _ALIASES[alias] = name


def canonical_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES:
        raise LowbitError(f"unknown number format {name!r}; known: {', '.join(list_formats())}")
    return key


def get_format(name: str) -> NumberFormat:
    key = canonical_name(name)
    if key not in _CACHE:
        _CACHE[key] = _FACTORIES[key]()
    return _CACHE[key]


def list_formats() -> list[str]:
    return sorted(_FACTORIES)


def _register_builtin() -> None:
    for bits in range(1, 9):
        register_format(f"int{bits}", lambda b=bits: IntFormat(b, signed=True))
        register_format(f"uint{bits}", lambda b=bits: IntFormat(b, signed=False))
    floats = {
        # name: (exponent bits, mantissa bits, bias, specials), aliases
        "fp8_e4m3": ((4, 3, 7, "fn"), ("e4m3", "fp8", "float8_e4m3fn", "fp8_e4m3fn")),
        "fp8_e5m2": ((5, 2, 15, "ieee"), ("e5m2", "float8_e5m2")),
        "fp6_e3m2": ((3, 2, 3, "none"), ("e3m2",)),
        "fp6_e2m3": ((2, 3, 1, "none"), ("e2m3", "fp6")),
        "fp4_e2m1": ((2, 1, 1, "none"), ("e2m1", "fp4")),
        "fp16": ((5, 10, 15, "ieee"), ("float16", "half")),
        "bf16": ((8, 7, 127, "ieee"), ("bfloat16",)),
    }
    for name, (params, aliases) in floats.items():
        register_format(name, lambda n=name, p=params: FloatFormat(n, *p), aliases)
    register_format("nf4", lambda: CodebookFormat("nf4", NF4_LEVELS, 4))
    register_format("bnb_fp4", lambda: CodebookFormat("bnb_fp4", BNB_FP4_LEVELS, 4))
    register_format("ternary", lambda: CodebookFormat("ternary", TERNARY_LEVELS, 2), ("int1.58", "b1.58"))
    register_format("e8m0", E8M0Format)


_register_builtin()

__all__ = [
    "NumberFormat", "IntFormat", "FloatFormat", "CodebookFormat", "E8M0Format",
    "get_format", "list_formats", "register_format", "canonical_name",
    "round_mantissa", "round_to_float", "NF4_LEVELS", "BNB_FP4_LEVELS",
]
