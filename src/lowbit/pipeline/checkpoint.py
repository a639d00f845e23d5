"""Checks on a model folder's weights made before anything is allocated: a safetensors header is read and
validated by hand (its length is never trusted), pickles are refused unopened, the size a config implies is
compared with the bytes on disk and the machine's memory, and loaded tensors must be finite."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError

MAX_HEADER = 100 * 2 ** 20  # safetensors' own limit on the JSON header
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
              "F6_E3M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8,
              "I64": 8, "F64": 8, "C64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def read_header(path) -> dict:
    """The validated header of a .safetensors file: {name: {"dtype", "shape", "data_offsets"}} (without
    __metadata__). Any inconsistency is a one-line LowbitError naming the file."""
    path = Path(path)

    def bad(what):
        return LowbitError(f"{path} is not a valid safetensors file: {what}")

    size = path.stat().st_size
    if size < 8:
        raise bad("empty" if size == 0 else f"only {size} bytes")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > min(MAX_HEADER, size - 8):
            raise bad(f"header length {n:,} is past the end of the file ({size:,} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    _check_entries(header, size - 8 - n, bad)
    return header


def _check_entries(header: dict, data_bytes: int, bad) -> None:
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in ITEM_BYTES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r} has data offsets {offsets!r}")
        if offsets[1] > data_bytes:
            raise bad(f"tensor {name!r} ends at byte {offsets[1]:,}, past the end of the data ({data_bytes:,})")
        need = math.prod(shape) * ITEM_BYTES[dtype]
        if dtype in ("F4", "F6_E2M3", "F6_E3M2"):
            need = offsets[1] - offsets[0]  # sub-byte types: packed, not checked here
        if offsets[1] - offsets[0] != need:
            raise bad(f"tensor {name!r} of shape {shape} {dtype} needs {need:,} bytes, its offsets span "
                      f"{offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise bad(f"tensors {a!r} and {b!r} overlap")
        if start > end:
            raise bad(f"a gap of {start - end:,} bytes lies between tensors {a!r} and {b!r}")
    first, last = (spans[0][0], spans[-1][1]) if spans else (0, 0)
    if first != 0 or last != data_bytes:  # safetensors' own rule: the tensors cover the data exactly
        raise bad(f"the tensors cover bytes {first:,} to {last:,} of {data_bytes:,}")


def weight_headers(path) -> dict[str, dict]:
    """{tensor name: header entry} over every .safetensors file of a model folder, each validated; a folder
    holding only pickle checkpoints is refused without opening them."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in PICKLES for p in path.glob(pattern))
        if pickles:
            raise LowbitError(f"{path / pickles[0]} is a pickle checkpoint, which lowbit never opens (it can run "
                              "code); convert it to safetensors where you trust it, e.g. "
                              "model.save_pretrained(folder, safe_serialization=True)")
        raise LowbitError(f"no .safetensors weights in {path}")
    out = {}
    for f in files:
        out.update(read_header(f))
    return out


TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def stored_dtype(headers: dict[str, dict]) -> torch.dtype | None:
    """The floating dtype most of the stored elements have (fp16, bf16 or fp32), None when none is."""
    counts: dict[str, int] = {}
    for e in headers.values():
        if e["dtype"] in TORCH_DTYPES:
            counts[e["dtype"]] = counts.get(e["dtype"], 0) + math.prod(e["shape"])
    return TORCH_DTYPES[max(counts, key=counts.get)] if counts else None


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def meta_model(build):
    """build() run on the meta device: the model's shapes without its memory (None when it cannot)."""
    try:
        with torch.device("meta"):
            return build()
    except (MemoryError, OverflowError, RuntimeError, ValueError, TypeError):
        return None


def check_against_disk(model: nn.Module, headers: dict[str, dict], path, quantized: bool = False,
                       element_bytes: int = 4) -> None:
    """A model built on the meta device against the weights on disk, before allocating it: shapes of the
    tensors both name, floating dtypes for floating parameters, and the implied size against the bytes on
    disk and the memory available. quantized: the disk holds packed weights (size checked loosely)."""
    state = model.state_dict()
    for key, t in state.items():
        e = headers.get(key)
        if e is None:
            continue
        if not quantized and list(t.shape) != e["shape"]:
            raise LowbitError(f"{path}: {key} has shape {e['shape']} on disk but the config implies {list(t.shape)}")
        if t.is_floating_point() and not quantized and e["dtype"] not in FLOAT_DTYPES:
            raise LowbitError(f"{path}: {key} is stored as {e['dtype']}, not a floating-point type")
    implied = sum(t.numel() for t in state.values())
    on_disk = sum(math.prod(e["shape"]) for e in headers.values())
    slack = 8 * on_disk if quantized else 2 * on_disk
    if implied > slack + 2 ** 20:
        raise LowbitError(f"{path}: the config implies {implied:,} parameters but the weights on disk hold "
                          f"{on_disk:,}; config.json does not describe these weights")
    free = available_memory()
    if free is not None and implied * element_bytes > free:
        raise LowbitError(f"{path}: the model needs {implied * element_bytes / 2 ** 30:,.1f} GiB in memory, "
                          f"{free / 2 ** 30:,.1f} GiB are available")


def check_finite(model: nn.Module, path) -> None:
    """Every floating-point tensor of a loaded model is finite (NaN/Inf weights or scales are refused)."""
    for key, t in model.state_dict().items():
        if t.is_floating_point() and t.element_size() == 1:
            t = t.float()   # torch has no isfinite for the float8 dtypes (FP8 weights and block scales)
        if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise LowbitError(f"{path}: {key} holds {bad:,} NaN or infinite values")


def loading_problems(info: dict, tied=()) -> str | None:
    """A phrase for transformers' loading info when tensors are missing, unexpected or mismatched, else None."""
    tied = set(tied or ())
    parts = []
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(what) or ()]
        keys = [k for k in keys if k not in tied]
        if keys:
            parts.append(f"{what.replace('_keys', '')} {', '.join(sorted(keys)[:3])}"
                         f"{' ...' if len(keys) > 3 else ''}")
    return "; ".join(parts) or None


def environment_threads(n: int | None) -> None:
    """Use n CPU threads for tensor work (None: leave torch's choice)."""
    if n is not None:
        if n < 1:
            raise LowbitError(f"--threads must be at least 1, got {n}")
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
