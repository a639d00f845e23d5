"""Native save/load and one module per export format, found through a registry.

An exporter is a translator that says what it holds: `accepts(weight)` is True when the format stores
that quantised weight exactly, and such weights are copied bit for bit. A quantised weight it does not
accept is refused with a one-line error naming the layer and the formats that would hold it, or, only
when the caller asks (`requantize=True`, `lowbit export --requantize`), dequantised and rounded again
with the exporter's `requantize_with` method, and the result says so. Linears left in full precision are
written as the format writes floats (or quantised by the format's own rules where the format is itself a
quantiser: GGUF file types).

Adding a format: a module with an Exporter subclass (name, accepts, write) registered with
`register_exporter(MyExporter())` and, if it reads back, `register_importer(name, fn)`; then its module
name in FORMAT_MODULES. write() and fn(path) take `progress=False`: with True (the CLI unless --quiet)
they show a bar over the tensors written or read (lowbit.io.progress).
"""
from __future__ import annotations

import importlib
from typing import Callable, ClassVar

from torch import nn

from lowbit.errors import LowbitError
from lowbit.methods import parse_method

EXPORTERS: dict[str, "Exporter"] = {}
IMPORTERS: dict[str, Callable] = {}

# Format modules register themselves on import; listed here so `lowbit export --format X` finds them.
FORMAT_MODULES = ("lowbit.io.gguf", "lowbit.io.gguf_read", "lowbit.io.gptq", "lowbit.io.awq", "lowbit.io.bnb",
                  "lowbit.io.compressed_tensors", "lowbit.io.aqlm")


def quantized_weights(model: nn.Module) -> dict[str, object]:
    """{module name: the weight it holds} for every module holding a quantised weight."""
    return {n: m.quantized() for n, m in model.named_modules() if callable(getattr(m, "quantized", None))}


KIND_NAMES = {"ActQuantWeight": "W8A8", "MixedInt8Weight": "LLM.int8()", "Quantized4bit": "bnb 4-bit",
              "GGMLTensor": "ggml"}


def describe(weight) -> str:
    """A few words naming a weight's scheme, for messages."""
    spec = getattr(weight, "spec", None)
    if spec is not None:
        words = [spec.format, f"g{spec.group_size}" if spec.group_size else f"per {spec.granularity}"]
        words += [] if spec.symmetric else ["asymmetric" + (f" ({spec.zero_dtype} zero points)" if spec.float_zero
                                                            else "")]
        words += [f"{spec.scale_dtype} scales"] if spec.scale_dtype != "fp16" else []
        words += ["act-order group index"] if getattr(weight, "g_idx", None) is not None else []
        return " ".join(words)
    kind = KIND_NAMES.get(type(weight).__name__, type(weight).__name__)
    detail = getattr(weight, "type", None) or getattr(weight, "quant_type", None)
    return f"{kind} {detail}" if detail else kind


class Exporter:
    """A file format that quantised models are written in. Subclasses set `name`, `requantize_with` (a
    method short name, or None when the format cannot re-round) and implement accepts() and write()."""

    name: ClassVar[str] = ""
    requantize_with: ClassVar[str | None] = None

    def problem(self, weight) -> str | None:
        """Why this format cannot hold `weight` exactly, or None when it can."""
        raise NotImplementedError

    def accepts(self, weight) -> bool:
        return self.problem(weight) is None

    def model_problem(self, weights: dict) -> str | None:
        """Why the format cannot hold these weights together (a layout with one scheme per model), or None."""
        return None

    def write(self, model: nn.Module, weights: dict, out, tokenizer=None, **options):
        """Write `model` with its quantised modules' `weights` (all accepted) to `out`."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, requantize: bool = False) -> tuple[dict, list[str]]:
        """(the weights to write, the names of those re-rounded): every held weight must be accepted,
        or re-rounded when `requantize` is set."""
        weights, redone = {}, []
        for name, w in quantized_weights(model).items():
            if self.accepts(w):
                weights[name] = w
            elif requantize and self.requantize_with:
                weights[name] = self._requantize(w)
                redone.append(name)
            else:
                raise LowbitError(self.refusal(name, w))
        problem = self.model_problem(weights)
        if problem:
            raise LowbitError(f"{self.name}: {problem}")
        return weights, redone

    def refusal(self, name: str, weight, fix: str | None = None) -> str:
        holders = [e for e in formats_holding(weight) if e != self.name]
        where = f"formats that hold it exactly: {', '.join(holders)}" if holders else "no export format holds it exactly"
        if fix is None and self.requantize_with:
            fix = f"pass --requantize to round it again as {self.requantize_with}"
        return (f"{name}: {describe(weight)} cannot be stored exactly in {self.name} ({self.problem(weight)}); "
                f"{where}" + (f"; {fix}" if fix else ""))

    def _requantize(self, weight):
        return parse_method(self.requantize_with).quantize_weight(weight.dequantize().float(), None)

    def export(self, model: nn.Module, out, tokenizer=None, requantize: bool = False, **options):
        """Check every held weight, then write. Returns what write() returns (the output path)."""
        weights, _ = self.prepare(model, requantize)
        return self.write(model, weights, out, tokenizer=tokenizer, requantize=requantize, **options)

    __call__ = export


def register_exporter(exporter: Exporter) -> Exporter:
    EXPORTERS[exporter.name] = exporter
    return exporter


def register_importer(name: str, fn: Callable) -> Callable:
    IMPORTERS[name] = fn
    return fn


def load_format_modules() -> None:
    for mod in FORMAT_MODULES:
        importlib.import_module(mod)


def formats_holding(weight) -> list[str]:
    """The registered export formats that store `weight` exactly."""
    load_format_modules()
    return sorted(name for name, e in EXPORTERS.items() if e.accepts(weight))


def get_exporter(name: str) -> Exporter:
    load_format_modules()
    if name not in EXPORTERS:
        raise LowbitError(f"unknown export format {name!r}; known: {', '.join(sorted(EXPORTERS)) or 'none'}")
    return EXPORTERS[name]


def get_importer(name: str) -> Callable:
    load_format_modules()
    if name not in IMPORTERS:
        raise LowbitError(f"unknown import format {name!r}; known: {', '.join(sorted(IMPORTERS)) or 'none'}")
    return IMPORTERS[name]
