"""The journal of a streamed run, so that the same command after an interruption resumes where it stopped.

Beside the output folder `out`, a hidden work folder `.<out name>.partial` holds:

    journal.json                 the inputs' hash, how many blocks are done, each done block's module
                                 layouts and report lines
    part-outside.safetensors     the tensors outside the blocks (embeddings, final norm, head)
    part-00007.safetensors       block 7's tensors as a save writes them
    inputs-00008.safetensors     the hidden states block 8 starts from (one tensor per calibration batch),
                                 and the full-precision model's there when the run keeps them (fine-tuning)

Each file is written whole and renamed into place, and the journal is written last, so at any kill the
journal names only blocks whose parts are complete and the inputs of the next block. The hash covers the
recipe, the calibration token ids, the batch size and the shards' headers, sizes and times: a run with
other inputs is refused rather than resumed into a mixed output.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.io.parts import write_part
from lowbit.pipeline.report import LayerReport

VERSION = 1


def inputs_hash(recipe, batches: list, shard_files: list[Path], batch_size: int) -> str:
    """sha256 (hex) of everything that decides the output bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": VERSION, "recipe": recipe.to_dict(), "batch_size": batch_size}).encode())
    for f in shard_files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 100 * 2 ** 20)))
    for ids, mask in batches:
        h.update(ids.numpy().tobytes())
        h.update(b"-" if mask is None else mask.numpy().tobytes())
    return h.hexdigest()


def work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


class Journal:
    """The work folder of one streamed run (created, or reopened when its hash matches)."""

    def __init__(self, out: Path, key: str):
        self.folder = work_folder(Path(out))
        self.file = self.folder / "journal.json"
        self.state = {"version": VERSION, "key": key, "done": 0, "outside": False, "blocks": []}
        if self.file.is_file():
            self._reopen(key)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _reopen(self, key: str) -> None:
        try:
            state = json.loads(self.file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise LowbitError(f"{self.file} is unreadable ({e}); remove {self.folder} to start over") from None
        if not isinstance(state, dict) or state.get("key") != key or state.get("version") != VERSION:
            raise LowbitError(f"{self.folder} holds an interrupted run with other inputs (model, method, "
                              "calibration or batch size differ); remove it to start over, or run that command")
        self.state = state

    @property
    def done(self) -> int:
        return int(self.state["done"])

    def part(self, index: int | None) -> Path:
        return self.folder / ("part-outside.safetensors" if index is None else f"part-{index:05d}.safetensors")

    def parts(self) -> list[Path]:
        return [self.part(None)] + [self.part(i) for i in range(self.done)]

    def _inputs(self, index: int) -> Path:
        return self.folder / f"inputs-{index:05d}.safetensors"

    def _write(self) -> None:
        tmp = self.folder / ".journal.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.file)

    def record_outside(self, tensors: dict) -> None:
        if not self.state["outside"]:
            write_part(self.part(None), tensors)
            self.state["outside"] = True
            self._write()

    def record(self, index: int, tensors: dict, modules: dict, reports: list[LayerReport], hidden: list,
               reference: list | None = None) -> None:
        """Block `index` is done: its tensors, layouts and report lines, and the next block's inputs (and
        their full-precision references, where kept)."""
        write_part(self.part(index), tensors)
        saved = {f"hidden.{j}": h.contiguous() for j, h in enumerate(hidden)}
        saved.update({f"reference.{j}": r.contiguous() for j, r in enumerate(reference or [])})
        write_part(self._inputs(index + 1), saved)
        self.state["blocks"] = self.state["blocks"][:index] + [{"modules": modules,
                                                                "reports": [asdict(r) for r in reports]}]
        self.state["done"] = index + 1
        self._write()
        self._inputs(index).unlink(missing_ok=True)

    def hidden(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The saved inputs of the first unfinished block, one tensor per calibration batch, and their
        full-precision references (None where the run kept none)."""
        saved = load_file(str(self._inputs(self.done)))
        n = sum(k.startswith("hidden.") for k in saved)
        reference = [saved[f"reference.{j}"] for j in range(n)] if "reference.0" in saved else None
        return [saved[f"hidden.{j}"] for j in range(n)], reference

    def modules(self) -> dict:
        return {n: c for b in self.state["blocks"] for n, c in b["modules"].items()}

    def reports(self) -> list[LayerReport]:
        return [LayerReport(**r) for b in self.state["blocks"] for r in b["reports"]]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
