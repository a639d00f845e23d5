"""The native format: a model folder that transformers' config and tokenizer files describe, plus

    model.safetensors     every tensor: quantised modules' packed buffers and the full-precision rest
    lowbit_config.json    the recipe and, per quantised module, what rebuilds it empty (its layer_config)
    quant_report.json     the per-layer report

Nothing is pickled. A save goes to a temporary folder that is renamed into place at the end.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_model, save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.hf_folder import (float_tensors, model_config, read_generation_config, source_name, write_metadata,
                                 writing_folder)
from lowbit.methods.recipe import Recipe
from lowbit.nn import MODULES
from lowbit.pipeline.checkpoint import check_against_disk, check_finite, meta_model, read_header, stored_dtype
from lowbit.pipeline.loading import conv1d_to_linear, load_tokenizer, read_config, set_module
from lowbit.pipeline.report import report_to_json

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 1
CONFIG_FILE = "lowbit_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_METADATA = {"format": "pt"}


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "layer_config")}


def save(model: nn.Module, out, tokenizer=None, extra=None) -> Path:
    """Write the native folder OUT atomically; extra(folder), when given, adds files (a training summary,
    a plot) to the folder before it is renamed into place, so they appear with it or not at all."""
    out = Path(out)
    with writing_folder(out) as tmp:
        modules = {n: m.layer_config() for n, m in quantized_modules(model).items()}
        write_files(tmp, model, modules, getattr(model, "lowbit_report", None), tokenizer)
        save_file(_tensors(model), str(tmp / WEIGHTS_FILE), metadata=WEIGHTS_METADATA)
        if extra is not None:
            extra(tmp)
    return out


def write_files(tmp: Path, model: nn.Module, modules: dict, report, tokenizer=None) -> None:
    """Everything of a native folder but its weights: the transformers config and tokenizer, the recipe
    and each quantised module's layout ({name: layer_config}) in lowbit_config.json, the report."""
    write_metadata(tmp, model, _saved_config(model), tokenizer)
    recipe = getattr(model, "lowbit_recipe", None)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model_class": type(model).__name__,
            "source": source_name(model), "recipe": recipe.to_dict() if recipe is not None else None, "modules": modules}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    if report is not None:
        (tmp / "quant_report.json").write_text(report_to_json(report))


def _tensors(model: nn.Module) -> dict:
    """The quantised modules' tensors as they are, the rest in the dtype the model was loaded from (an fp16
    model's embeddings and norms stay fp16, so the folder is the size its memory report promises)."""
    return tensors_of(model, getattr(model, "lowbit_source_dtype", None))


def tensors_of(module: nn.Module, dtype, prefix: str = "") -> dict:
    """What a save writes of `module` (a model, or one block whose names get `prefix`): its quantised
    modules' tensors as they are, the other floating tensors in `dtype` (None: as they are)."""
    quantized = quantized_modules(module)
    tensors = float_tensors(module, quantized, dtype)
    for name, m in quantized.items():
        tensors.update({f"{name}.{k}": v.detach().contiguous() for k, v in m.state_dict().items()})
    return {prefix + k: v for k, v in tensors.items()}


def _saved_config(model: nn.Module):
    dtype = getattr(model, "lowbit_source_dtype", None)
    return model_config(model, getattr(model.config, "quantization_config", None), dtype) if dtype else model.config


def is_native(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path / CONFIG_FILE} is not valid JSON: {e}")
    except RecursionError:
        raise LowbitError(f"{path / CONFIG_FILE} is nested too deeply to be a lowbit config") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise LowbitError(f"{path} is not a lowbit v{FORMAT_VERSION} model folder")
    return meta


def _empty_model(path: Path, meta: dict):
    import transformers

    config = read_config(path)
    cls = getattr(transformers, meta.get("model_class", ""), None)
    if cls is None:
        raise LowbitError(f"unknown model class {meta.get('model_class')!r} in {path / CONFIG_FILE}")
    # Built on the CPU, not the meta device: non-persistent buffers (rotary inv_freq) are computed in
    # __init__ and are not in the checkpoint.
    return cls(config)


def load(path):
    """(model, tokenizer or None) from a native lowbit folder."""
    path = Path(path)
    if not is_native(path):
        raise LowbitError(f"not a lowbit model folder: {path} (no {CONFIG_FILE})")
    meta = _read_meta(path)
    modules = meta.get("modules")
    if not isinstance(modules, dict):
        raise LowbitError(f"{path / CONFIG_FILE}: 'modules' must map module names to their layouts")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LowbitError(f"{weights} is missing")
    headers = read_header(weights)  # validated by hand before safetensors or torch allocate anything
    shapes = meta_model(lambda: _empty_model(path, meta))
    if shapes is None:
        raise LowbitError(f"cannot build the model {path / 'config.json'} describes")
    check_against_disk(shapes, headers, path, quantized=True)
    model = _empty_model(path, meta)
    conv1d_to_linear(model)
    for name, cfg in modules.items():
        _check_layout(model, name, cfg, path)
        set_module(model, name, _rebuild(name, cfg, path))
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line),
                      str(e).splitlines()[0])
        raise LowbitError(f"cannot read {weights}: {detail}") from e
    _check_keys(model, missing, unexpected, weights)
    check_finite(model, path)
    read_generation_config(model, path)
    model.lowbit_source_dtype = stored_dtype(headers)
    if isinstance(meta.get("source"), str) and meta["source"]:
        model.lowbit_source_name = meta["source"]   # the model it came from, not this folder
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if meta.get("recipe") is not None:     # None: saved without one; {}, 0, "" are malformed
        model.lowbit_recipe = _saved_recipe(meta["recipe"], path)
    model.eval()
    return model, load_tokenizer(path)


def _saved_recipe(d, path: Path) -> Recipe:
    """The recipe a folder was quantised with; a malformed one is a one-line error naming the file."""
    try:
        return Recipe.from_dict(d)
    except LowbitError as e:
        raise LowbitError(f"{path / CONFIG_FILE}: the saved recipe is invalid ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LowbitError(f"{path / CONFIG_FILE}: the saved recipe is malformed ({type(e).__name__}: {e})") from None


def _check_layout(model: nn.Module, name: str, cfg, path: Path) -> None:
    """A layout's shape is the shape of the Linear it replaces (a lying layout would allocate at will)."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise LowbitError(f"{path / CONFIG_FILE} names {name!r}, which the model does not have") from None
    if not isinstance(cfg, dict) or not hasattr(old, "weight") or old.weight.dim() != 2:
        return
    want = {"in_features": old.weight.shape[1], "out_features": old.weight.shape[0]}
    for key, n in want.items():
        if key in cfg and cfg[key] != n:
            raise LowbitError(f"{path / CONFIG_FILE}: {name} has {key} {cfg[key]!r}, the model's Linear has {n}")


def _rebuild(name: str, cfg, path: Path) -> nn.Module:
    """The empty module a saved layout describes; a malformed layout is a one-line error naming it."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("module"), str) or cfg["module"] not in MODULES:
        kind = cfg.get("module") if isinstance(cfg, dict) else cfg
        raise LowbitError(f"unknown module type {kind!r} for {name} in {path / CONFIG_FILE}")
    try:
        return MODULES[cfg["module"]].from_layer_config(cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LowbitError(f"{path / CONFIG_FILE}: the layout of {name} is malformed ({type(e).__name__}: {e})") from e


def _check_keys(model: nn.Module, missing, unexpected, weights: Path) -> None:
    # Tied weights (embeddings shared with the head) are stored once and may be reported missing.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise LowbitError(f"{weights} does not match the model: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
