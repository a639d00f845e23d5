"""Loading Hugging Face model folders from disk, with one-line errors for what users get wrong."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

# A local folder never needs the hub; without this a typo'd path can turn into a network lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def resolve_model_path(path) -> Path:
    from lowbit.data import bundled_model_path

    if path is None:
        return bundled_model_path()
    p = Path(path)
    if not p.exists():
        raise LowbitError(f"model folder not found: {p}")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise LowbitError(f"not a model folder: {p} (no config.json)")
    return p


def read_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path / 'config.json'} is not valid JSON: {e}")
    except RecursionError:
        raise LowbitError(f"{path / 'config.json'} is nested too deeply to be a model config") from None
    _check_generation_config(path / "generation_config.json")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        model_type = json.loads((path / "config.json").read_text()).get("model_type", "?")
        hint = "" if trust_remote_code else " (if it ships its own code and you trust it, pass --trust-remote-code)"
        raise LowbitError(f"unsupported architecture {model_type!r}: transformers cannot build it{hint}") from e


def _check_generation_config(f: Path) -> None:
    """A folder's generation_config.json, when there is one, is a JSON object (transformers fails on a list
    with a traceback, and a save or export copies the file on)."""
    if not f.is_file():
        return
    try:
        ok = isinstance(json.loads(f.read_text()), dict)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        ok = False
    if not ok:
        raise LowbitError(f"{f} is not a JSON object; fix or remove it")


def is_causal_lm(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return not getattr(config, "is_encoder_decoder", False) and config.model_type not in ("bert", "roberta")


def load_model(path=None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer or None) from a model folder; None means the bundled model."""
    from transformers import AutoModel, AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress is per block; theirs would interleave with it
    from lowbit.pipeline.checkpoint import (check_against_disk, check_finite, loading_problems, meta_model, stored_dtype,
                                           weight_headers)

    path = resolve_model_path(path)
    config = read_config(path, trust_remote_code)
    headers = weight_headers(path)  # validated by hand before any loader reads them; pickles refused
    cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    shapes = meta_model(lambda: cls.from_config(config, trust_remote_code=trust_remote_code))
    if shapes is None:
        raise LowbitError(f"cannot build the model {path / 'config.json'} describes")
    # a pre-quantised checkpoint (quantization_config) stores packed tensors: its size is checked loosely
    check_against_disk(shapes, headers, path, quantized=getattr(config, "quantization_config", None) is not None)
    tied = _tied_keys(shapes)
    del shapes
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is a table on stderr; ours below is one line
    try:
        model, info = cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                          output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise LowbitError(f"cannot load the weights in {path}: {str(e).splitlines()[0]}") from e
    finally:
        hf_logging.set_verbosity(level)
    problem = loading_problems(info, tied)
    if problem:
        raise LowbitError(f"the weights in {path} do not match its config.json: {problem}")
    check_finite(model, path)
    model.lowbit_source_dtype = stored_dtype(headers)  # what a save writes the unquantised tensors in
    model.eval()
    return model, load_tokenizer(path)


def _tied_keys(model) -> set:
    keys = getattr(model, "_tied_weights_keys", None) or ()
    return set(keys)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
    if not any((Path(path) / n).exists() for n in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace transformers' Conv1D (GPT-2's Linear with a transposed weight) by nn.Linear."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return 0
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, m in swaps:
        lin = nn.Linear(m.weight.shape[0], m.weight.shape[1], bias=m.bias is not None)
        lin.weight.data = m.weight.data.T.contiguous()
        if m.bias is not None:
            lin.bias.data = m.bias.data.clone()
        lin.hf_conv1d = True   # the model's own checkpoints store this weight transposed (io/hf_folder.py)
        set_module(model, name, lin)
    return len(swaps)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
        if not hasattr(parent, child):
            raise AttributeError(child)
    except (AttributeError, IndexError, TypeError):
        raise LowbitError(f"the model has no module {name!r}") from None
    if getattr(getattr(parent, child), "hf_conv1d", False):
        module.hf_conv1d = True     # a quantised module in a Conv1D's place: exporters need to know
    setattr(parent, child, module)
