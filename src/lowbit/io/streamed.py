"""Quantise a model folder into the native format without ever holding more than one block of it.

The skeleton (pipeline/streaming.py) gets the tensors outside the blocks for the capture pass, which are
written to their part and freed; then each block is read from the shards when reached, quantised by the
ordinary runner, written to its part with a journal entry (io/journal.py) and freed. At the end the parts
are assembled into model.safetensors (io/parts.py) in a temporary folder renamed into place, so the
folder equals, byte for byte, `lowbit.save` of the same model quantised in memory.

Resident memory: the larger of (the tensors outside the blocks, in float32) and (one block in float32
plus its quantised copy), plus the calibration activations and the statistics of one block.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.atomic import check_output
from lowbit.io.hf_folder import float_tensors, read_generation_config, writing_folder
from lowbit.io.journal import Journal, inputs_hash
from lowbit.io.native import WEIGHTS_FILE, WEIGHTS_METADATA, quantized_modules, tensors_of, write_files
from lowbit.io.parts import assemble
from lowbit.methods.recipe import as_recipe
from lowbit.pipeline.arch import block_list, describe
from lowbit.pipeline.distributed import Split
from lowbit.pipeline.runner import BlockStream, block_configs, check_tuning, layer_plan, quantize_model
from lowbit.pipeline.samples import CalibrationSet
from lowbit.pipeline.streaming import fixed_mmap_threshold, free, load_tensors, release_memory

STOP_HOOK = "LOWBIT_TEST_STOP"  # "k:SIGNAL": the process signals itself once block k is journalled (tests)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a streamed run: `hint` is the one line that says how to resume."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


class NativeStream(BlockStream):
    """Reads each block from the shards, writes it to the journal's parts once quantised, frees it."""

    def __init__(self, model: nn.Module, shards, journal: Journal):
        self.model, self.shards, self.journal = model, shards, journal
        self.path = block_list(model, describe(model))[0]
        self.dtype = getattr(model, "lowbit_source_dtype", None)
        self.loaded: set[int] = set()
        load_tensors(model, shards, outside=self.path + ".")   # embeddings for the capture pass
        journal.record_outside(float_tensors(model, {self.path}, self.dtype))

    def load(self, index: int, block: nn.Module) -> None:
        if index not in self.loaded:
            load_tensors(self.model, self.shards, prefix=f"{self.path}.{index}.")
            self.loaded.add(index)

    def begin(self, blocks, inputs) -> tuple[int, list]:
        free(self.model, outside=self.path + ".")
        start = self.journal.done
        if start:
            free(self.model, prefix=f"{self.path}.0")
            self.loaded.discard(0)
            hidden, reference = self.journal.hidden()
            keeps = bool(inputs) and inputs[0].reference is not None
            if len(hidden) != len(inputs) or (reference is not None) != keeps:
                raise LowbitError(f"{self.journal.folder} was written by another lowbit; remove it to start over")
            for j, x in enumerate(inputs):
                x.hidden = hidden[j]
                x.reference = None if reference is None else reference[j]
                for _ in range(start):
                    x.next_block()
        release_memory()
        return start, self.journal.reports()

    def layer_done(self) -> None:
        release_memory()   # else the heap keeps each Linear's temporaries and the peak creeps up block by block

    def done(self, index: int, block: nn.Module, reports: list, inputs) -> None:
        prefix = f"{self.path}.{index}."
        modules = {prefix + n: m.layer_config() for n, m in quantized_modules(block).items()}
        self.journal.record(index, tensors_of(block, self.dtype, prefix), modules, reports, [x.hidden for x in inputs],
                            [x.reference for x in inputs] if inputs and inputs[0].reference is not None else None)
        free(self.model, prefix=prefix)
        self.loaded.discard(index)
        release_memory()
        _test_stop(index)


def _test_stop(index: int) -> None:
    """The kill-and-resume tests' hook: signal this process after block `index` when asked to."""
    spec = os.environ.get(STOP_HOOK, "")
    if spec.partition(":")[0] == str(index):
        os.kill(os.getpid(), getattr(signal, spec.partition(":")[2] or "SIGKILL"))


def _refuse_outside(model: nn.Module, recipe) -> None:
    path = block_list(model, describe(model))[0]
    outside = [n for n in layer_plan(model, recipe)[0] if not n.startswith(path + ".")]
    if outside:
        raise LowbitError(f"streaming quantises the decoder blocks only; {outside[0]} lies outside them: keep it in "
                          f"full precision (--skip {outside[0]}) or quantise without --stream")


def quantize_streamed(model: nn.Module, shards, config_or_recipe, calibration: CalibrationSet | None, out,
                      tokenizer=None, batch_size: int = 8, progress: bool = True) -> nn.Module:
    """Quantise the skeleton `model` (pipeline/streaming.skeleton) block by block from `shards` into a
    native folder at `out`, resuming an interrupted run of the same inputs. Returns the skeleton with the
    run's recipe, report and calibration description (its weights are gone)."""
    out = check_output(Path(out), "output folder")
    recipe = as_recipe(config_or_recipe)
    _refuse_outside(model, recipe)
    path, blocks = block_list(model, describe(model))
    check_tuning(block_configs(blocks, path, recipe), Split(1), streamed=True)   # before any file is written
    calibration = CalibrationSet.of(calibration)
    batches = calibration.batches(batch_size) if calibration is not None else []
    fixed_mmap_threshold()
    journal = Journal(out, inputs_hash(recipe, batches, shards.files, batch_size))
    stream = NativeStream(model, shards, journal)
    n_blocks = len(block_list(model, describe(model))[1])
    read_generation_config(model, shards.files[0].parent)   # the skeleton was built from config.json alone
    try:
        quantize_model(model, recipe, calibration, batch_size=batch_size, progress=progress, stream=stream)
        with writing_folder(out) as tmp:
            write_files(tmp, model, journal.modules(), model.lowbit_report, tokenizer)
            assemble(journal.parts(), tmp / WEIGHTS_FILE, WEIGHTS_METADATA)
    except KeyboardInterrupt:
        raise Interrupted(f"lowbit: interrupted with {journal.done} of {n_blocks} blocks done; run the same "
                          f"command again to resume at block {journal.done} ({journal.folder} keeps the work)") from None
    journal.remove()
    return model
