"""Native save/load and one module per export format, found through a registry.

An exporter is `fn(model, out_path, **options)`; it translates QuantizedTensors into a file layout and
never re-quantises unless the target format demands its own rounding (then that rounding is a method).
"""
from __future__ import annotations

import importlib
from typing import Callable

from lowbit.errors import LowbitError

EXPORTERS: dict[str, Callable] = {}
IMPORTERS: dict[str, Callable] = {}

# Format modules register themselves on import; listed here so `lowbit export --format X` finds them.
FORMAT_MODULES = ("lowbit.io.gguf", "lowbit.io.gptq", "lowbit.io.awq", "lowbit.io.bnb",
                  "lowbit.io.compressed_tensors")


def register_exporter(name: str, fn: Callable) -> Callable:
    EXPORTERS[name] = fn
    return fn


def register_importer(name: str, fn: Callable) -> Callable:
    IMPORTERS[name] = fn
    return fn


def load_format_modules() -> None:
    for mod in FORMAT_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if not mod.startswith(e.name or "\0"):  # a missing dependency inside the module is a real error
                raise


def get_exporter(name: str) -> Callable:
    load_format_modules()
    if name not in EXPORTERS:
        raise LowbitError(f"unknown export format {name!r}; known: {', '.join(sorted(EXPORTERS)) or 'none'}")
    return EXPORTERS[name]


def get_importer(name: str) -> Callable:
    load_format_modules()
    if name not in IMPORTERS:
        raise LowbitError(f"unknown import format {name!r}; known: {', '.join(sorted(IMPORTERS)) or 'none'}")
    return IMPORTERS[name]
