"""`lowbit plan`: what a quantisation run will need, from a model folder's config and shard headers alone.

No weight is read. The model is built on the meta device for its shapes; the shards' headers (validated
by hand) give the bytes on disk. Peak resident memory is modelled phase by phase (all in bytes):

    base      this process's resident set once torch, transformers and the skeleton are in (measured)
    outside   the tensors outside the blocks in float32, plus the largest of what follows in turn: their
              mapped shard pages, their copy written out and its serialisation, block 0 read, the capture
    block     the largest block in float32 and its mapped pages while read; while quantised: the block,
              the calibration hidden states twice (inputs and outputs), one batch's intermediates, the
              statistics of the largest group of Linears (float64 X^T X) and the method's working copies
    in memory every tensor in float32, plus the largest of: the shards' pages mapped while loading, the
              block phase's working memory, and the output twice (its copy and its serialisation)

Time comes from a probe: the method run once on a random weight of each distinct Linear shape (with a
random Gram matrix of the calibration size when it needs one), and one block's forward matmuls timed at
this machine's measured matmul rate.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.methods.base import LayerInfo
from lowbit.methods.recipe import as_recipe
from lowbit.methods.stats import LayerStats
from lowbit.pipeline.arch import block_list, describe, sequential_groups
from lowbit.pipeline.blocks import block_linears
from lowbit.pipeline.checkpoint import available_memory
from lowbit.pipeline.calibration import needs_calibration
from lowbit.pipeline.samples import context_length
from lowbit.pipeline.streaming import float32_bytes, skeleton
from lowbit.pipeline.tuning import tunes

BATCH = 8
DEFAULT_SEQ_LEN = 256  # what quantize cuts calibration to when not told (api.DEFAULT_SEQ_LEN)
GB = 2 ** 30


@dataclass
class Plan:
    blocks: int
    parameters: int
    weights_fp32_bytes: int
    output_bytes: int
    disk_bytes: int               # the output plus the streamed run's parts and saved activations
    streamed_peak_bytes: int
    in_memory_peak_bytes: int
    available_bytes: int | None
    seconds: float | None
    base_bytes: int
    streams: bool = True          # False where the method cannot run streamed (end-to-end tuning)

    @property
    def peak_bytes(self) -> int:
        return self.streamed_peak_bytes

    def fits(self, streamed: bool) -> bool:
        if streamed and not self.streams:
            return False
        need = self.streamed_peak_bytes if streamed else self.in_memory_peak_bytes
        return self.available_bytes is None or need <= self.available_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc), 0 when unknown."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096
    except (OSError, ValueError, IndexError):
        return 0


def _split(model, shards) -> tuple[str, list[dict], dict]:
    """(blocks' path, [{name: entry} of each block], {name: entry} outside the blocks)."""
    path, blocks = block_list(model, describe(model))
    per_block: list[dict] = [{} for _ in blocks]
    outside = {}
    for name, entry in shards.entries().items():
        head = name[len(path) + 1:].split(".", 1)[0] if name.startswith(path + ".") else None
        if head is not None and head.isdigit() and int(head) < len(blocks):
            per_block[int(head)][name] = entry
        else:
            outside[name] = entry
    return path, per_block, outside


def _disk(entries: dict) -> int:
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())


def _fp32(entries: dict) -> int:
    return sum(float32_bytes(e) if e["dtype"] in ("F16", "BF16", "F32") else
               e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())


def _linears(model, recipe) -> list[tuple[str, tuple, object, LayerInfo]]:
    """(name inside the block, [out, in], config, info) of block 0's quantised Linears."""
    path, blocks = block_list(model, describe(model))
    out = []
    for n, m in block_linears(blocks[0]).items():
        info = LayerInfo(f"{path}.0.{n}", describe(model).roles.get(n), 0, len(blocks), 1)
        cfg = recipe.config_for(info.name)
        if cfg is not None:
            out.append((n, tuple(m.weight.shape), cfg.for_layer(info), info))
    return out


def _output_bytes(entries: dict, path: str, index: int, linears) -> int:
    """What block `index` takes in the output: its quantised weights as planned, the rest as on disk."""
    total = _disk(entries)
    for n, shape, cfg, info in linears:
        entry = entries.get(f"{path}.{index}.{n}.weight")
        if entry is not None:
            w = cfg.planned_weight(torch.Size(shape), info)
            total += (getattr(w, "nbytes", None) or math.prod(shape) // 2) - _disk({n: entry})
    return total


def _working_bytes(model, linears, tokens: int, seq_len: int, calibrated: bool) -> int:
    """Activations, one batch's intermediates, the largest group's statistics and the method's copies."""
    d = model.config.hidden_size
    widest = max((s[0] * s[1] for _, s, _, _ in linears), default=0)
    work = 4 * widest * 4                                        # the weight, its copies, dequantised report
    if not calibrated or not tokens:
        return work
    batch = _batch_bytes(model, seq_len)
    acts = 2 * tokens * d * 4 + batch
    if _tuned(linears):   # the full-precision references, the targets, and a batch's graph for backward
        acts += 2 * tokens * d * 4 + 2 * batch
    groups = sequential_groups(describe(model), [n for n, *_ in linears]) if linears else []
    shapes = {n: s for n, s, _, _ in linears}
    stats = max((sum(shapes[n][1] ** 2 * 8 for n in g) for g in groups), default=0)
    solve = max((s[1] ** 2 * 4 * 3 for s in shapes.values()), default=0)  # H, its inverse, a factor
    return acts + stats + solve + work


def _batch_bytes(model, seq_len: int) -> int:
    """One calibration batch's intermediates in one block (float32)."""
    cfg = model.config
    d = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", 4 * d) or 4 * d
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    return BATCH * seq_len * (3 * inter + 4 * d) * 4 + BATCH * heads * seq_len ** 2 * 4


def _tuned(linears) -> bool:
    """Whether the configs fine-tune the blocks (pipeline/tuning.py): the run then keeps more activations."""
    return tunes(cfg for _, _, cfg, _ in linears)


def _probe_seconds(model, linears, tokens: int, calibrated: bool) -> float:
    """Seconds per block on this machine: the method on a random weight of each shape, plus the block's
    forward matmuls (one pass per group of Linears, and one to move the activations on)."""
    torch.manual_seed(0)
    rows = min(max(tokens, 1), 2048)
    seconds, flops = 0.0, 0
    for _, shape, cfg, _ in linears:
        stats = LayerStats(shape[1])
        if calibrated and tokens:
            stats.update(torch.randn(rows, shape[1]))
        start = time.perf_counter()
        cfg.quantize_weight(torch.randn(shape) * 0.02, stats)
        seconds += time.perf_counter() - start
        flops += 2 * tokens * shape[0] * shape[1]
    if flops:
        a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        rate = 4 * 2 * 512 * 1024 * 1024 / max(time.perf_counter() - start, 1e-9)
        passes = 1 + len(sequential_groups(describe(model), [n for n, *_ in linears]))
        seconds += passes * flops / rate
    return seconds


def plan_folder(folder, method, samples: int = 0, seq_len: int | None = None, probe: bool = True) -> Plan:
    """The Plan of quantising the folder with `method` (a config, short name or Recipe) on `samples`
    calibration sequences of `seq_len` tokens (None: min(context, 256) as quantize does; 0 samples: a
    calibration-free run that reads no text)."""
    model, shards = skeleton(folder)
    seq_len = seq_len or min(context_length(model) or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    if samples < 0 or seq_len < 1:
        raise LowbitError(f"--samples must be at least 0 and --seq-len at least 1, got {samples} and {seq_len}")
    recipe = as_recipe(method)
    base = resident_bytes()
    path, per_block, outside = _split(model, shards)
    linears = _linears(model, recipe)
    calibrated = bool(samples) or needs_calibration(recipe)
    tokens = samples * seq_len
    block32 = max((_fp32(b) for b in per_block), default=0)
    block_disk = max((_disk(b) for b in per_block), default=0)
    work = _working_bytes(model, linears, tokens, seq_len, calibrated)
    out32, out_disk = _fp32(outside), _disk(outside)
    hidden = tokens * model.config.hidden_size * 4
    # the phases before block 0 follow each other: reading (pages mapped), writing (a copy in the stored
    # dtype and its serialisation), block 0's reading, the capture pass's activations
    outside_phase = out32 + max(2 * out_disk, block32 + block_disk, block32 + 2 * hidden)
    block_phase = max(block32 + block_disk, block32 + work)
    # end-to-end tuning (never streamed): the first block's inputs and a batch's graph through every block
    tunes_end_to_end = any(cfg.model_tuning[0] > 0 for _, _, cfg, _ in linears)
    e2e = hidden + len(per_block) * _batch_bytes(model, seq_len) if tunes_end_to_end and calibrated else 0
    output = out_disk + sum(_output_bytes(b, path, i, linears) for i, b in enumerate(per_block))
    total32 = out32 + sum(_fp32(b) for b in per_block)
    return Plan(blocks=len(per_block), parameters=sum(math.prod(e["shape"]) for e in shards.entries().values()),
                weights_fp32_bytes=total32, output_bytes=output,
                disk_bytes=2 * output + (4 if _tuned(linears) else 2) * hidden,
                streamed_peak_bytes=base + max(outside_phase, block_phase),
                in_memory_peak_bytes=base + total32 + max(_disk(shards.entries()), work + e2e, 2 * output), available_bytes=available_memory(),
                seconds=len(per_block) * _probe_seconds(model, linears, tokens, calibrated) if probe else None,
                base_bytes=base, streams=not tunes_end_to_end)


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:,.1f} h"


def describe_plan(plan: Plan, method: str, folder) -> str:
    """The plan as the `lowbit plan` command prints it."""
    free = "unknown" if plan.available_bytes is None else f"{plan.available_bytes / GB:,.2f} GiB"
    cannot = "" if plan.streams else " (end-to-end tuning, e2e, cannot stream)"
    verdict = ("fits in memory" if plan.fits(False) else "fits only with --stream" if plan.fits(True)
               else f"does not fit, not even with --stream{cannot}")
    lines = [f"plan: {method} on {folder or 'the bundled model'} ({plan.blocks} blocks, {plan.parameters / 1e9:,.3f} B "
             f"parameters, {plan.weights_fp32_bytes / GB:,.2f} GiB in float32)",
             f"  peak memory  {plan.in_memory_peak_bytes / GB:,.2f} GiB in memory, "
             + (f"{plan.streamed_peak_bytes / GB:,.2f} GiB with --stream" if plan.streams else "no --stream run" + cannot)
             + f" (of which {plan.base_bytes / GB:,.2f} GiB is this process before any weight); available {free}",
             f"  disk         {plan.output_bytes / GB:,.2f} GiB of output; {plan.disk_bytes / GB:,.2f} GiB while a "
             f"--stream run keeps its parts beside it"]
    if plan.seconds is not None:
        lines.append(f"  time         about {_duration(plan.seconds)} ({plan.seconds / max(plan.blocks, 1):,.1f} s per "
                     "block, from a probe of one block's shapes on this machine)")
    lines.append(f"  verdict      {verdict}")
    return "\n".join(lines)
