"""One safetensors file assembled from many small ones, byte for byte what safetensors would write.

A streamed run writes each block's tensors to its own part file as the block is done; at the end the parts
are copied into one model.safetensors a tensor at a time (64 MiB at most in memory), with the header
safetensors itself writes for the same tensors: ordered by dtype (its own order, asked of safetensors on a
one-element tensor per dtype, never assumed) then by name, compact JSON padded with spaces to 8 bytes. So a
streamed folder equals the in-memory save of the same model, byte for byte.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from lowbit.errors import LowbitError
from lowbit.io.atomic import no_space
from lowbit.pipeline.checkpoint import read_header

CHUNK = 64 * 2 ** 20
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
          "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32,
          "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def write_part(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`tensors` to `path` through a temporary sibling renamed into place (a kill leaves the old or none)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if no_space(e, path.parent):   # the finished parts stay: the same command resumes once there is room
            raise LowbitError(f"no space left on device writing {path}; free some and run the same command again "
                              "to resume") from e
        raise


def dtype_order(dtypes) -> list[str]:
    """The safetensors dtype names in the order safetensors lays tensors out (it sorts by dtype first)."""
    dtypes = sorted(set(dtypes))
    raw = save({d: torch.zeros(1, dtype=DTYPES[d]) for d in dtypes})
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda d: header[d]["data_offsets"][0])


def _header(entries: dict[str, dict], metadata: dict | None) -> tuple[bytes, list[str]]:
    """(the header bytes with its length prefix, the tensor names in file order)."""
    rank = {d: i for i, d in enumerate(dtype_order(e["dtype"] for e in entries.values()))}
    names = sorted(entries, key=lambda n: (rank[entries[n]["dtype"]], n))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for n in names:
        e = entries[n]
        size = e["data_offsets"][1] - e["data_offsets"][0]
        header[n] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, names


def assemble(parts: list[Path], out: Path, metadata: dict | None = None) -> None:
    """One safetensors file at `out` holding every tensor of `parts` (names must not repeat)."""
    where: dict[str, tuple[Path, int, dict]] = {}
    for p in parts:
        with open(p, "rb") as f:
            start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, e in read_header(p).items():
            where[name] = (p, start, e)
    head, names = _header({n: e for n, (_, _, e) in where.items()}, metadata)
    handles: dict[Path, object] = {}
    try:
        with open(out, "wb") as dst:
            dst.write(head)
            for n in names:
                p, start, e = where[n]
                src = handles.get(p) or handles.setdefault(p, open(p, "rb"))
                _copy(src, dst, start + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0])
    finally:
        for h in handles.values():
            h.close()


def _copy(src, dst, offset: int, size: int) -> None:
    src.seek(offset)
    while size > 0:
        chunk = src.read(min(CHUNK, size))
        if not chunk:
            raise OSError(f"{src.name} ended early")
        dst.write(chunk)
        size -= len(chunk)
