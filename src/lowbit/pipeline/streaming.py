"""A model larger than memory, read from its safetensors shards a block at a time.

The model is built as a skeleton whose parameters live on the meta device (no memory; buffers computed
in __init__, such as rotary tables, stay real), and tensors are read from the shards only when asked for:
the tensors outside the blocks for the capture pass, then one decoder block at a time. Every tensor is
checked against the skeleton (name, shape, finite) as it is read; a shard's header is validated by hand
before safetensors maps it (pipeline/checkpoint.py). What the in-memory loader does to the values
(floating tensors to float32) is done here too, so both paths quantise the same numbers.
"""
from __future__ import annotations

import ctypes
import gc
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.pipeline.checkpoint import read_header, stored_dtype
from lowbit.pipeline.loading import is_causal_lm, read_config, resolve_model_path


@contextmanager
def meta_parameters():
    """Inside: every parameter a module registers is moved to the meta device as it is registered (its
    initialisation is then a no-op), while buffers are made as usual. torch.empty's pages for the moment
    between are never touched, so they cost no resident memory."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:   # a tied weight is registered again as it is
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class Shards:
    """The tensors of a model folder's .safetensors files: {name: (file, header entry)}, every header
    validated before any is opened; `read(names)` maps a file only while reading from it."""

    def __init__(self, folder: Path):
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise LowbitError(f"no .safetensors weights in {folder}")
        self.where: dict[str, tuple[Path, dict]] = {}
        for f in files:
            for name, entry in read_header(f).items():
                self.where[name] = (f, entry)
        self.files = files

    def entries(self) -> dict[str, dict]:
        return {n: e for n, (_, e) in self.where.items()}

    def nbytes(self, names) -> int:
        """Bytes the named tensors take on disk."""
        return sum(self.where[n][1]["data_offsets"][1] - self.where[n][1]["data_offsets"][0] for n in names)

    def read(self, names) -> dict[str, torch.Tensor]:
        """{name: tensor} read from the shards, one file mapped at a time (the mapping is dropped after)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n][0], []).append(n)
        out = {}
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for k in keys:
                    out[k] = handle.get_tensor(k)
        return out


def skeleton(path) -> tuple[nn.Module, Shards]:
    """(the model a folder's config describes, parameters on the meta device; its shards)."""
    from transformers import AutoModel, AutoModelForCausalLM

    path = resolve_model_path(path)
    config = read_config(path)
    shards = Shards(path)
    cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    try:
        with meta_parameters():
            model = cls.from_config(config)
    except (RuntimeError, ValueError, TypeError) as e:
        raise LowbitError(f"cannot build the model {path / 'config.json'} describes: {str(e).splitlines()[0]}") from e
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        raise LowbitError(f"{model.config.model_type}: streaming does not read Conv1D weights (GPT-2 style); "
                          "quantise without --stream")
    model.lowbit_source_dtype = stored_dtype(shards.entries())
    model.eval()
    check_names(model, shards, path)
    return model, shards


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """{state-dict name: every name of the same tensor} (tied weights share one parameter)."""
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    out = {n: [n] for n in model.state_dict()}
    for names in by_id.values():
        for n in names:
            out[n] = names
    return out


def check_names(model: nn.Module, shards: Shards, path) -> None:
    """Every tensor of the skeleton is on disk (or tied to one that is) with its shape, and the disk holds
    nothing the skeleton lacks: one line naming the first that differs."""
    on_disk = shards.where
    names = aliases(model)
    missing = sorted(n for n in model.state_dict() if not any(a in on_disk for a in names.get(n, [n])))
    unexpected = sorted(n for n in on_disk if n not in names)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise LowbitError(f"the weights in {path} do not match its config.json ({what}, "
                          f"{len(missing)} missing and {len(unexpected)} unexpected in all)")
    state = model.state_dict()
    for n, (_, e) in on_disk.items():
        if list(state[n].shape) != e["shape"]:
            raise LowbitError(f"{path}: {n} has shape {e['shape']} on disk but the config implies "
                              f"{list(state[n].shape)}")


def _put(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def load_tensors(model: nn.Module, shards: Shards, prefix: str | None = None, outside: str | None = None) -> int:
    """Read from the shards the state-dict tensors under `prefix` (or, with `outside`, every one not under
    that path) into the skeleton, floating ones as float32 as the in-memory loader does; tied names get
    the same tensor. Returns the bytes read. A tensor with NaN or Inf is refused, naming it."""
    names = aliases(model)
    wanted = [n for n in shards.where
              if (prefix is not None and n.startswith(prefix)) or (outside is not None and not n.startswith(outside))]
    for n, t in shards.read(wanted).items():
        if t.is_floating_point():
            t = t.float()
            if not torch.isfinite(t).all():
                raise LowbitError(f"{shards.where[n][0]}: {n} holds {int((~torch.isfinite(t)).sum()):,} NaN or "
                                  "infinite values")
        for alias in names[n]:
            _put(model, alias, t)
    return shards.nbytes(wanted)


def free(model: nn.Module, prefix: str | None = None, outside: str | None = None) -> None:
    """Move to the meta device, releasing their memory, the parameters under `prefix` (a block, whatever
    modules now hold its weights) or, with `outside`, every parameter not under that path (buffers
    computed at build time, such as rotary tables, are kept)."""
    if prefix is not None:
        model.get_submodule(prefix.rstrip(".")).to("meta")
        return
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if not name.startswith(outside):
            _put(model, name, p.detach().to("meta"))


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def fixed_mmap_threshold(nbytes: int = 2 ** 20) -> None:
    """Allocations of `nbytes` or more get their own pages, returned to the system when freed. glibc
    otherwise raises this threshold after each large free (up to 32 MiB) and keeps such tensors in its heap,
    where fragments make the resident set creep up block after block though nothing is held."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, nbytes)


def release_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the system (between blocks)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def float32_bytes(entry: dict) -> int:
    return math.prod(entry["shape"]) * 4
