"""One grammar for short method names, shared by the CLI, the Python API, saved files and reports.

    <method>[-<scheme words>][-<method words>]       gptq-int4-g128-actorder, rtn-nf4-b64, awq-uint4-g128

Scheme words change the method's default scheme (a QuantSpec):
    intN / uintN      an integer grid of N bits (uintN: asymmetric); a format name (nf4, fp4, fp8_e4m3 ...)
    gN / bN           groups (blocks) of N inputs;  channel / tensor: one scale per output row / per tensor
    sym / asym        a fixed or a stored zero point
    mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, mxint8   OCP MX v1.0: the element format in blocks
                      of 32 with an E8M0 scale (scale dtype "mx"); nvfp4: E2M1 in blocks of 16, E4M3
                      scales under an FP32 tensor scale ("nv"). One word sets grid, group and scale.
A grid word without a group word means per channel ("rtn-int8"). Method words are each method's own,
in the order its `words` table lists them: a word -> the field values it sets ({"actorder": {"act_order":
True}}), or a prefix -> the field its number sets ({"a": "alpha"} reads "a0.8"). Any other word is a
one-line error naming the words the method takes.
"""
from __future__ import annotations

import re
from dataclasses import MISSING, fields

from lowbit.core import QuantSpec
from lowbit.core.spec import SCALE_DTYPES, ZERO_DTYPES
from lowbit.errors import LowbitError
from lowbit.formats import canonical_name, get_format

SCHEME_WORDS = ("intN, uintN, a format name (nf4, fp4, fp8_e4m3, ...), gN, bN, channel, tensor, sym, asym, "
                "s<dtype> for scales (sfp32, sbf16, se8m0), z<dtype> for zero points (zfp16, zint), "
                "mxfp4, mxfp6_e2m3, mxfp6_e3m2, mxfp8_e4m3, mxfp8_e5m2, mxint8, nvfp4")
# word -> (format, block size, scale dtype): the microscaling schemes, one word each
BLOCK_SCHEMES = {"mxfp8_e4m3": ("fp8_e4m3", 32, "mx"), "mxfp8_e5m2": ("fp8_e5m2", 32, "mx"),
                 "mxfp6_e3m2": ("fp6_e3m2", 32, "mx"), "mxfp6_e2m3": ("fp6_e2m3", 32, "mx"),
                 "mxfp4": ("fp4_e2m1", 32, "mx"), "mxint8": ("int8", 32, "mx"), "nvfp4": ("fp4_e2m1", 16, "nv")}
_BLOCK_ALIASES = {"mxfp8": "mxfp8_e4m3", "mxfp6": "mxfp6_e2m3"}
_INT = re.compile(r"(u?)int(\d+)", re.ASCII)
_GROUP = re.compile(r"[gb](\d+)", re.ASCII)
_NUMBER = re.compile(r"\d+(\.\d*)?(e-?\d+)?", re.ASCII)
_SCALE_WORDS = {f"s{d}": d for d in SCALE_DTYPES}
_ZERO_WORDS = {f"z{d}": d for d in ZERO_DTYPES}


# ---------------------------------------------------------------------------------------------------
# Scheme words

def _format_word(word: str) -> str | None:
    """The canonical format a word names, or None (integer grids are read by _INT)."""
    try:
        name = canonical_name(word)
    except LowbitError:
        return None
    return None if get_format(name).is_integer else name


def _scheme_word(w: str) -> tuple[str, dict] | None:
    """(the slot a scheme word fills, the changes it makes), or None when it is not a scheme word."""
    if (b := _BLOCK_ALIASES.get(w, w)) in BLOCK_SCHEMES:
        fmt, block, scale = BLOCK_SCHEMES[b]
        return "block scheme", {"format": fmt, "symmetric": True, "group_size": block, "scale_dtype": scale}
    if m := _INT.fullmatch(w):
        return "grid", {"bits": int(m.group(2)), **({"symmetric": False} if m.group(1) else {})}
    if m := _GROUP.fullmatch(w):
        return "group", {"group_size": int(m.group(1))}
    if w in ("channel", "tensor"):
        return "group", {"group_size": None, "granularity": w}
    if w in ("sym", "asym"):
        return "symmetry", {"symmetric": w == "sym"}
    if w in _SCALE_WORDS:
        return "scale", {"scale_dtype": _SCALE_WORDS[w]}
    if w in _ZERO_WORDS:
        return "zero", {"zero_dtype": _ZERO_WORDS[w]}
    if (fmt := _format_word(w)) is not None:
        return "grid", {"format": fmt}
    return None


def parse_scheme(words: list[str], default: QuantSpec) -> tuple[QuantSpec, list[str]]:
    """(the scheme the words describe on top of `default`, the words that are not scheme words). Two
    words for one slot (two grids, two group sizes, uint4 and sym ...) are an error."""
    changes: dict = {}
    filled: dict[str, str] = {}
    rest = []
    for w in words:
        found = _scheme_word(w)
        if found is None:
            rest.append(w)
            continue
        slot, change = found
        if "symmetric" in change and slot == "grid":
            _fill(filled, "symmetry", w)
        if slot == "block scheme":
            for part in ("grid", "group", "scale"):
                _fill(filled, part, w)
        else:
            _fill(filled, slot, w)
        changes.update(change)
    if "grid" in filled and "group" not in filled:
        changes["group_size"] = None
    return _apply(default, changes), rest


def _fill(filled: dict, slot: str, word: str) -> None:
    if slot in filled:
        raise LowbitError(f"the words {filled[slot]!r} and {word!r} both set the {slot} of the scheme")
    filled[slot] = word


def _apply(default: QuantSpec, changes: dict) -> QuantSpec:
    granularity = changes.pop("granularity", None)
    spec = default.updated(**changes) if changes else default
    if granularity == "tensor":
        spec = QuantSpec(spec.format, "tensor", None, spec.symmetric, spec.scale_dtype, spec.zero_dtype)
    return spec


def scheme_words(spec: QuantSpec, default: QuantSpec) -> list[str]:
    """The words that spell `spec` for a method whose default scheme is `default`."""
    fmt = spec.number_format
    block = next((w for w, v in BLOCK_SCHEMES.items() if v == (spec.format, spec.group_size, spec.scale_dtype)), None)
    if block is not None and spec.symmetric:
        return [block]
    words = [f"int{fmt.bits}" if fmt.is_integer else spec.format]
    if spec.granularity == "group":
        words.append(f"g{spec.group_size}")
    elif spec.granularity in ("tensor", "token"):
        words.append(spec.granularity)
    if spec.symmetric != default.symmetric or fmt.is_integer and fmt.signed != spec.symmetric:
        words.append("sym" if spec.symmetric else "asym")
    if spec.scale_dtype != default.scale_dtype:
        words.append(f"s{spec.scale_dtype}")
    if spec.zero_dtype != default.zero_dtype and not spec.symmetric:
        words.append(f"z{spec.zero_dtype}")
    return words


# ---------------------------------------------------------------------------------------------------
# Method words

def _defaults(cls) -> dict:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def _number(text: str, like):
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return int(value) if isinstance(like, int) and not isinstance(like, bool) and value.is_integer() else value


def parse_words(cls, words: list[str], full_name: str) -> dict:
    """Field values of `cls` from its method words."""
    kwargs: dict = {}
    defaults = _defaults(cls)
    valued = {p: f for p, f in cls.words.items() if isinstance(f, str)}
    set_by: dict[str, str] = {}
    for w in words:
        if isinstance(cls.words.get(w), dict):
            change = cls.words[w]
        else:
            prefix = next((p for p in valued if w.startswith(p) and _number(w[len(p):], 0) is not None), None)
            if prefix is None:
                raise LowbitError(f"unrecognised word {w!r} in method name {full_name!r}; {cls.name} takes "
                                  f"{expected_words(cls)}")
            change = {valued[prefix]: _number(w[len(prefix):], defaults.get(valued[prefix]))}
        for field_name in change:
            if field_name in set_by:
                raise LowbitError(f"the words {set_by[field_name]!r} and {w!r} in {full_name!r} both set {field_name}")
            set_by[field_name] = w
        kwargs.update(change)
    return kwargs


def expected_words(cls) -> str:
    parts = [SCHEME_WORDS] if hasattr(cls, "default_scheme") else []
    parts += [w if isinstance(v, dict) else f"{w}N" for w, v in cls.words.items()]
    return ", ".join(parts) if parts else "no words"


def method_words(config) -> list[str]:
    """The method words of a config: a flag word when the config holds its values and they are not the
    defaults; a valued word when its field differs from the default."""
    defaults = _defaults(type(config))
    out = []
    for word, values in type(config).words.items():
        if isinstance(values, str):
            value = getattr(config, values)
            if value is not None and value != defaults.get(values):
                out.append(f"{word}{value:g}")
        elif all(getattr(config, k) == v for k, v in values.items()) and any(
                defaults.get(k, MISSING) != v for k, v in values.items()):
            out.append(word)
    return out
