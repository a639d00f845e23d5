"""Method configs and their registry.

A method is a frozen dataclass (its settings) with `quantize_weight(weight, stats) -> a weight type of
lowbit.weights`, which calls the method's pure tensor function. `required_stats` says what the pipeline
must gather; `for_layer(LayerInfo)` may specialise the config for one Linear (by its role, never by its
name). A method never chooses a module, touches a model or writes a file: nn/ picks the module for the
weight type, the pipeline plumbs, io/ writes.

Methods that choose values on a grid take the scheme as one value (`SchemeMethod.scheme`, a QuantSpec);
`GPTQ(bits=3, group_size=64)` is shorthand for changing the method's default scheme. Short names
("rtn-int4-g128", "gptq-int3-g128-actorder") follow one grammar (methods/names.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch

from lowbit.core import QuantSpec
from lowbit.errors import LowbitError
from lowbit.methods import names
from lowbit.methods.stats import LayerStats
from lowbit.weights import placeholders

METHODS: dict[str, type["MethodConfig"]] = {}
SCALE_ONLY_FORMATS = ("e8m0",)


@dataclass(frozen=True)
class LayerInfo:
    """What the pipeline tells a method about the Linear it quantises, from the model's Arch.

    role: the tensor's role in GGUF's vocabulary ("attn_q", "attn_k", "attn_v", "attn_qkv",
    "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output"; a fused gate/up projection is "ffn_up", as
    in llama.cpp), None when the Arch names
    none; layer: the block index (None outside the blocks); n_gqa: query heads per key/value head."""

    name: str
    role: str | None = None
    layer: int | None = None
    n_layers: int = 1
    n_gqa: int = 1


SHORTHAND = ("format", "bits", "group_size", "symmetric", "scale_dtype", "zero_dtype")
_PLAIN_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


class _ConfigMeta(type):
    """Makes every config check its settings' types on construction (a saved folder's `"symmetric":
    "false"` must not quietly mean True), and lets `GPTQ(bits=3, group_size=64)` stand for a change of
    the default scheme: those keywords are folded into `scheme` first (so dataclasses.replace works too)."""

    def __call__(cls, *args, **kwargs):
        if hasattr(cls, "default_scheme"):
            short = {k: kwargs.pop(k) for k in SHORTHAND if k in kwargs}
            if short:
                kwargs["scheme"] = resolve_scheme(kwargs.pop("scheme", None), cls.default_scheme).updated(**short)
        config = super().__call__(*args, **kwargs)
        _check_types(config)
        return config


def _check_types(config) -> None:
    for f in fields(config):
        kinds = [k.strip() for k in str(f.type).split("|")]
        allowed = [t for k in kinds for t in _PLAIN_TYPES.get(k, ())]
        if len(allowed) < len([k for k in kinds if k != "None"]):
            continue                                   # a type this check does not know: left to the config
        value = getattr(config, f.name)
        if value is None and "None" in kinds:
            continue
        if not isinstance(value, tuple(allowed)) or (isinstance(value, bool) and bool not in allowed):
            raise LowbitError(f"{config.name}: {f.name} must be {' or '.join(kinds)}, got {value!r}")


@dataclass(frozen=True)
class MethodConfig(metaclass=_ConfigMeta):
    name: ClassVar[str] = ""
    required_stats: ClassVar[tuple[str, ...]] = ()
    # Whether sub-layers of a block are quantised one group at a time, each seeing the outputs of the
    # already-quantised groups before it (GPTQ's "true sequential"). Costs one pass per group.
    sequential: ClassVar[bool] = False
    # The method's own short-name words (methods/names.py): word -> field values, or prefix -> field.
    words: ClassVar[dict] = {}
    # Whether the method's values come from training (`lowbit qat`) rather than from quantize_weight alone.
    trains: ClassVar[bool] = False
    # Whether quantize_weight(weight, this Linear's own LayerStats) is the whole method for one Linear:
    # nothing block-level (scales moved between layers) it would miss. Mixed precision then measures the
    # sensitivity of a candidate without a scheme (a lattice, codebooks) with the method itself.
    # (Block fine-tuning, which follows, is left out of that measurement.)
    alone: ClassVar[bool] = False

    def quantize_weight(self, weight: torch.Tensor, stats: LayerStats | None):
        raise NotImplementedError

    def for_layer(self, layer: LayerInfo) -> "MethodConfig":
        """The config to use for one Linear; the same config unless the method treats roles differently."""
        return self

    def planned_weight(self, shape: torch.Size, layer: LayerInfo):
        """The weight this config will produce for a Linear of `shape` [out, in], as a placeholder (its type,
        scheme and shapes; no values): what export and engine checks read before calibrating. None when
        the method cannot say."""
        return None

    @property
    def block_tuning(self) -> tuple[int, float]:
        """(epochs, learning rate) of the block fine-tuning that follows quantising a block
        (pipeline/tuning.py); 0 epochs: none."""
        return 0, 0.0

    @property
    def model_tuning(self) -> tuple[int, float]:
        """(epochs, learning rate) of the end-to-end fine-tuning of every block together once all are
        quantised (pipeline/tuning.py); 0 epochs: none."""
        return 0, 0.0

    def module_options(self) -> dict:
        """Options for the module nn/ builds around this method's weights (e.g. a compute dtype)."""
        return {}

    def short_name(self) -> str:
        return "-".join([self.name, *self._scheme_words(), *names.method_words(self)])

    def _scheme_words(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        d = {k: v for k, v in d.items() if k != "method"}
        accepted = {f.name for f in fields(cls)} | set(getattr(cls, "shorthand", ()))
        unknown = sorted(set(d) - accepted)
        if unknown:
            raise LowbitError(f"{cls.name} has no setting {unknown[0]!r}")
        return cls(**d)

    @classmethod
    def from_short_name(cls, rest: list[str]) -> "MethodConfig":
        """Build from the dash-separated words after the method name, e.g. ["actorder"]."""
        return cls(**names.parse_words(cls, rest, "-".join([cls.name, *rest])))


# Adam's step of the end-to-end tuning: all blocks move at once, so a tenth of the blocks' own step (on
# all-MiniLM-L6-v2, aqlm-r8-ft8-e2e8: mean cosine 0.8872 at 1e-4; at 1e-3 no epoch lowered the held-out
# error and the tuning was undone, 0.8842)
E2E_LR = 1e-4


class BlockTuned:
    """Mixin of the methods whose quantised blocks can be fine-tuned (pipeline/tuning.py): the dataclass
    declares `finetune` (epochs of each block's tuning, 0: none) at `finetune_lr` (Adam's step), and `e2e`
    (epochs of the end-to-end tuning of all blocks together at the end, 0: none) at `e2e_lr`, and calls
    check_finetune()."""

    finetune: int
    finetune_lr: float
    e2e: int
    e2e_lr: float

    def check_finetune(self) -> None:
        if not all(isinstance(n, int) and n >= 0 for n in (self.finetune, self.e2e)) or not all(
                0 < lr < math.inf for lr in (self.finetune_lr, self.e2e_lr)):
            raise LowbitError(f"{self.name}: finetune and e2e epochs must be integers >= 0 and their learning rates "
                              f"> 0, got finetune={self.finetune!r}, e2e={self.e2e!r}, finetune_lr={self.finetune_lr!r}, "
                              f"e2e_lr={self.e2e_lr!r}")

    @property
    def block_tuning(self) -> tuple[int, float]:
        return self.finetune, self.finetune_lr

    @property
    def model_tuning(self) -> tuple[int, float]:
        return self.e2e, self.e2e_lr


# ---------------------------------------------------------------------------------------------------
# Methods over a scheme

def resolve_scheme(scheme, default: str) -> QuantSpec:
    """A QuantSpec from a QuantSpec, its dict, its short words ("int4-g128") or None (the default)."""
    if isinstance(scheme, QuantSpec):
        return scheme
    if isinstance(scheme, dict):
        return QuantSpec.from_dict(scheme)
    if scheme is None or isinstance(scheme, str):
        base, rest = names.parse_scheme(default.split("-"), QuantSpec())
        if scheme:
            base, rest = names.parse_scheme(scheme.lower().split("-"), base)
        if rest:
            raise LowbitError(f"unrecognised scheme word {rest[0]!r} in {scheme!r}; expected {names.SCHEME_WORDS}")
        return base
    raise LowbitError(f"a scheme is a QuantSpec or its short words such as 'int4-g128', got {type(scheme).__name__}")


@dataclass(frozen=True)
class SchemeMethod(MethodConfig):
    """A method that chooses values on a given scheme (QuantSpec): RTN, GPTQ, AWQ, ...

    scheme: a QuantSpec, or its short words ("int4-g128", "uint4-g128", "nf4-b64"); the keywords bits,
    group_size, symmetric, format, scale_dtype and zero_dtype change the method's default scheme."""

    default_scheme: ClassVar[str] = "int4-g128"
    granularities: ClassVar[tuple[str, ...]] = ("channel", "group")
    shorthand: ClassVar[tuple[str, ...]] = SHORTHAND
    scheme: QuantSpec | str | None = None

    def __post_init__(self):
        object.__setattr__(self, "scheme", resolve_scheme(self.scheme, self.default_scheme))
        fmt = self.scheme.number_format
        if fmt.is_integer and fmt.bits < 2:
            raise LowbitError(f"{self.name} takes integer grids of 2..8 bits, not {self.scheme.format}")
        if self.scheme.format in SCALE_ONLY_FORMATS:
            raise LowbitError(f"{self.scheme.format} is a scale format, not a grid for weights")
        if self.scheme.granularity not in self.granularities:
            raise LowbitError(f"{self.name} quantises weights per {' or per '.join(self.granularities)}, "
                              f"not per {self.scheme.granularity}")

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def group_size(self) -> int | None:
        return self.scheme.group_size

    @property
    def symmetric(self) -> bool:
        return self.scheme.symmetric

    @property
    def scale_dtype(self) -> str:
        return self.scheme.scale_dtype

    def spec(self) -> QuantSpec:
        return self.scheme

    def planned_weight(self, shape: torch.Size, layer: LayerInfo):
        return placeholders.affine(shape, self.scheme)

    def _scheme_words(self) -> list[str]:
        return names.scheme_words(self.scheme, resolve_scheme(None, self.default_scheme))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "scheme": self.scheme.to_dict()}

    @classmethod
    def from_short_name(cls, rest: list[str]) -> "SchemeMethod":
        scheme, rest_words = names.parse_scheme(rest, resolve_scheme(None, cls.default_scheme))
        kwargs = names.parse_words(cls, rest_words, "-".join([cls.name, *rest]))
        return cls(scheme=scheme, **kwargs)


# ---------------------------------------------------------------------------------------------------
# The registry

def register_method(cls: type[MethodConfig]) -> type[MethodConfig]:
    METHODS[cls.name] = cls
    return cls


def method_from_dict(d: dict) -> MethodConfig:
    if not isinstance(d, dict):
        raise LowbitError(f"a method config must be a dict, got {type(d).__name__}")
    name = d.get("method")
    if not isinstance(name, str) or name not in METHODS:
        raise LowbitError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name].from_dict({k: v for k, v in d.items() if k != "method"})


def parse_method(short: str) -> MethodConfig:
    """'rtn-int4-g128' -> RTN(scheme=int4 g128). The method name is the longest leading run of
    dash-separated words that names a registered method ('llm-int8-t4', 'q4_k_m-imatrix')."""
    short = short.strip().lower()
    if short in METHODS:
        return METHODS[short].from_short_name([])
    words = short.split("-")
    for k in range(len(words) - 1, 0, -1):
        head = "-".join(words[:k])
        if head in METHODS:
            return METHODS[head].from_short_name(words[k:])
    raise LowbitError(f"unknown method {short!r}; known methods: {', '.join(sorted(METHODS))}")
