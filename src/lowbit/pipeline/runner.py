"""The layer-by-layer pipeline (as GPTQ and llm-compressor do it).

Run the calibration batches up to the first block and keep its inputs; then for each block: fold the
input scales the recipe's scaling methods choose (pipeline/scaling.py), gather the statistics every
Linear's method asks for, quantise (group by group when the method is sequential), swap in the module nn/
picks for the weight, and feed the quantised block's outputs to the next. Only one block's activations
live at a time.
"""
from __future__ import annotations

import math
import sys
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.methods.base import LayerInfo
from lowbit.methods.recipe import Recipe, as_recipe
from lowbit.methods.stats import LayerStats
from lowbit.nn import module_for
from lowbit.pipeline.arch import Arch, block_list, describe, sequential_groups, shared_input_groups
from lowbit.pipeline.blocks import (BlockInput, advance, as_batch, block_linears, capture_block_inputs,
                                    collect_stats, keep_reference, observe_linears, real_rows,
                                    reference_outputs, run_model)
from lowbit.pipeline.distributed import Split, current_split
from lowbit.pipeline.loading import conv1d_to_linear, set_module
from lowbit.pipeline.report import LayerReport, layer_report
from lowbit.pipeline.samples import CalibrationSet, check_context, check_token_ids

SHOWN = 12   # offending Linears listed by name; the rest are counted
from lowbit.pipeline.scaling import scale_block
from lowbit.pipeline.tuning import tune_block, tune_blocks, tunes


def quantize_linear(config, info: LayerInfo, module: nn.Linear, stats: LayerStats | None) -> tuple[nn.Module, LayerReport]:
    """(the module that runs the quantised weight, its report line)."""
    cfg = config.for_layer(info)
    weight = module.weight.detach().float()
    try:
        q = cfg.quantize_weight(weight, stats)
    except LowbitError as e:   # the method's one line, said of this layer
        raise LowbitError(f"{info.name}: {e}") from None
    bias = None if module.bias is None else module.bias.detach()
    if stats is not None and not stats.n_tokens and not cfg.required_stats:
        stats = None   # no text was read, and the method needed none: nothing to warn about
    return module_for(q, bias, **cfg.module_options()), layer_report(info.name, cfg.short_name(), weight, q, stats)


def _gqa(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or 1
    return max(1, heads // (getattr(config, "num_key_value_heads", None) or heads))


def _quantize_block(block, prefix: str, index: int, inputs: list[BlockInput], recipe: Recipe, arch: Arch,
                    n_layers: int, n_gqa: int, after_layer=lambda: None, split: Split | None = None) -> list[LayerReport]:
    linears = block_linears(block)
    plan = {n: recipe.config_for(f"{prefix}.{n}") for n in linears}
    todo = [n for n in linears if plan[n] is not None]
    if not todo:
        return []
    sequential = any(plan[n].sequential for n in todo)
    groups = sequential_groups(arch, todo) if sequential else [todo]
    keep = any("inputs" in plan[n].required_stats for n in todo)
    reports = []
    for group in groups:
        stats = collect_stats(block, inputs, {n: linears[n] for n in group}, keep, split)

        def solve(n, stats=stats):
            info = LayerInfo(f"{prefix}.{n}", arch.roles.get(n), index, n_layers, n_gqa)
            return quantize_linear(plan[n], info, linears[n], stats[n])
        reports += solve_and_swap(block, group, solve, split, after_layer)
        del stats
    return reports


E2E_CANNOT_STREAM = ("end-to-end fine-tuning (e2e) needs every block in memory at once; drop --stream, or the e2e "
                     "word (block fine-tuning, ftN, streams)")


def block_configs(blocks, path: str, recipe: Recipe) -> list:
    """The configs the recipe gives the blocks' Linears (Linears outside the blocks are never tuned)."""
    return [c for i, b in enumerate(blocks) for n in block_linears(b)
            if (c := recipe.config_for(f"{path}.{i}.{n}")) is not None]


def check_tuning(configs: list, split: Split, streamed: bool) -> tuple[int, float] | None:
    """Refuse, before any work, the fine-tuning a run cannot do; return (epochs, lr) of the end-to-end tuning
    the configs ask for (the most epochs among them), or None."""
    if split.world > 1 and any(c.block_tuning[0] > 0 for c in configs):
        raise LowbitError("block fine-tuning (finetune) runs in one process; run it without torchrun")
    asked = max((c.model_tuning for c in configs), default=(0, 0.0))
    if asked[0] <= 0:
        return None
    if split.world > 1:
        raise LowbitError("end-to-end fine-tuning (e2e) runs in one process; run it without torchrun")
    if streamed:
        raise LowbitError(E2E_CANNOT_STREAM)
    return asked


def refresh_bits(reports: list[LayerReport], root: nn.Module, prefix: str = "") -> None:
    """Bits per weight of the reports (names under `root`'s `prefix`) from the modules as they are now
    stored (tuning may store more: QuIP#'s real-valued signs)."""
    for r in reports:
        module = root.get_submodule(r.name[len(prefix) + 1:] if prefix else r.name)
        if callable(getattr(module, "quantized", None)):
            r.bits_per_weight = float(module.quantized().bits_per_element)


def _block_tuning(block, prefix: str, recipe: Recipe, calibrated: bool) -> tuple[int, float] | None:
    """(epochs, lr) of the block fine-tuning the block's configs ask for (the most epochs among them), or
    None."""
    configs = [c for n in block_linears(block) if (c := recipe.config_for(f"{prefix}.{n}")) is not None]
    asked = max((c.block_tuning for c in configs), default=(0, 0.0))
    return asked if asked[0] > 0 and calibrated else None


def solve_and_swap(root: nn.Module, names: list[str], solve, split: Split | None = None,
                   after=lambda: None) -> list[LayerReport]:
    """Quantise the Linears `names` of `root` (independent of each other: their statistics are gathered)
    with solve(name) -> (module, report), Linear i on rank i % world, and swap every result into every
    rank's copy in the order of `names`. Returns the reports in that order."""
    split = split or Split(0)
    reports = []
    for r, sources in split.rounds(len(names)):
        own = solve(names[r * split.world + split.rank]) if split.rank in sources else (None, None)
        for src in sources:
            new, report = own if src == split.rank else (None, None)
            set_module(root, names[r * split.world + src], split.share_module(new, src))
            reports.append(split.share_report(report, src))
            after()
    return reports


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


def _quantize_outside_blocks(model, arch: Arch, blocks_path, recipe, batches, n_layers,
                             split: Split | None = None) -> list[LayerReport]:
    """Linears outside the blocks (an output head a recipe asks for): stats from a full forward pass over
    this rank's `batches`."""
    linears = {n: m for n, m in _linears(model).items()
               if not n.startswith(blocks_path + ".") and recipe.config_for(n) is not None}
    if not linears:
        return []

    def rows(batch, x):
        mask = as_batch(batch)[1]
        return real_rows(x, None if mask is None else mask.bool())
    stats = observe_linears(linears, batches, lambda batch: run_model(model, batch), rows, split=split)

    def solve(n):
        info = LayerInfo(n, arch.globals.get(n), None, n_layers, _gqa(model))
        return quantize_linear(recipe.config_for(n), info, linears[n], stats[n])
    return solve_and_swap(model, list(linears), solve, split)


def _shape_problem(config, info: LayerInfo, module: nn.Linear) -> str | None:
    """Why `config` cannot quantise this Linear's shape (its group size does not divide the width ...), or
    None: the method's own placeholder of the weight is built from the shape, and says."""
    try:
        config.planned_weight(module.weight.shape, info)
    except LowbitError as e:
        return str(e)
    return None


def _suggestion(bad: dict, block_path: str) -> str:
    """A skip pattern for the offending Linears ({name: (config, width)}), and a group size that divides
    every offending width."""
    inside = block_path + "."
    patterns = dict.fromkeys("*." + n[len(inside):].split(".", 1)[1] if n.startswith(inside) else n for n in bad)
    hint = f"keep them in full precision (--skip {' '.join(patterns)}, or Recipe(skip=[...]))"
    sizes = {getattr(cfg, "group_size", None) for cfg, _ in bad.values()}
    g = sizes.pop() if len(sizes) == 1 else None
    if isinstance(g, int):
        common = math.gcd(*(w for _, w in bad.values()))
        fits = [1 << k for k in range(3, g.bit_length()) if (1 << k) < g and common % (1 << k) == 0]
        if fits:
            hint += f", or use a group size that divides every width, such as {fits[-1]}"
    return hint


def check_shapes(model: nn.Module, plan: dict, block_path: str) -> None:
    """One check over every selected Linear before any work: a one-line LowbitError naming each Linear
    whose shape its config cannot take (grouped by reason, which gives the width), a skip pattern and a
    group size that fits; the model is untouched."""
    modules = dict(model.named_modules())
    by_reason: dict[str, list[str]] = {}
    for n, (cfg, info) in plan.items():
        problem = _shape_problem(cfg, info, modules[n])
        if problem:
            by_reason.setdefault(problem, []).append(n)
    if by_reason:
        bad = [n for names in by_reason.values() for n in names]
        parts = [f"{reason} in {', '.join(names[:SHOWN])}" + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN
                                                              else "") for reason, names in by_reason.items()]
        hint = _suggestion({n: (plan[n][0], modules[n].in_features) for n in bad}, block_path)
        raise LowbitError(f"nothing was quantised: {'; '.join(parts)}; {hint}")


def check_fused_parameters(blocks, path: str, recipe: Recipe, family: str) -> None:
    """Weights held as 3-D parameters rather than Linears (transformers 5 fuses a mixture-of-experts
    layer's experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]) are not quantised: refused in one
    line naming the family unless the recipe keeps their module in full precision on purpose."""
    fused, total = [], 0
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                total += p.numel()
                if p.dim() >= 3 and recipe.config_for(f"{path}.{i}.{name}") is not None:
                    fused.append((f"{path}.{i}.{name}.{p_name}", p))
    if fused:
        share = sum(p.numel() for _, p in fused) / max(total, 1)
        first, p = fused[0]
        where = first.split(".", path.count(".") + 2)[-1].rpartition(".")[0]
        raise LowbitError(f"{family}: the experts are fused 3-D parameters, not Linears ({first} "
                          f"{list(p.shape)} and {len(fused) - 1} more), which lowbit does not quantise: {share:.1%} "
                          f"of the block weights would stay in float; keep them in full precision on purpose "
                          f"with --skip '*.{where}' (Recipe(skip=[...]))")


def layer_plan(model: nn.Module, config_or_recipe) -> tuple[dict, list[list[str]]]:
    """Before any work: ({Linear name: (its config for that layer, LayerInfo)} for every Linear the recipe
    quantises, [the names of each group of Linears that share an input]). Reads shapes only; a recipe
    that cannot take some Linear's shape is refused here (check_shapes)."""
    recipe = as_recipe(config_or_recipe)
    conv1d_to_linear(model)
    arch = describe(model)
    path, blocks = block_list(model, arch)
    n_gqa, plan = _gqa(model), {}
    for i, block in enumerate(blocks):
        prefix = f"{path}.{i}"
        for n in block_linears(block):
            config = recipe.config_for(f"{prefix}.{n}")
            if config is not None:
                info = LayerInfo(f"{prefix}.{n}", arch.roles.get(n), i, len(blocks), n_gqa)
                plan[info.name] = (config.for_layer(info), info)
    for n, m in _linears(model).items():
        if not n.startswith(path + ".") and recipe.config_for(n) is not None:
            info = LayerInfo(n, arch.globals.get(n), None, len(blocks), n_gqa)
            plan[n] = (recipe.config_for(n).for_layer(info), info)
    check_fused_parameters(blocks, path, recipe, arch.family)
    check_shapes(model, plan, path)
    return plan, shared_input_groups(model)


def planned_weights(model: nn.Module, config_or_recipe) -> tuple[dict, list[list[str]]]:
    """({Linear name: placeholder of the weight its config will produce}, fused groups), for checks that
    must run before calibration (engine limits)."""
    plan, groups = layer_plan(model, config_or_recipe)
    shapes = dict(model.named_modules())
    out = {n: cfg.planned_weight(shapes[n].weight.shape, info) for n, (cfg, info) in plan.items()}
    return {n: w for n, w in out.items() if w is not None}, groups


def _tune_end_to_end(blocks, first: list[BlockInput], last: list[BlockInput], reports: list[LayerReport],
                     model: nn.Module, tuning: tuple[int, float], progress: bool) -> None:
    """Every block tuned together towards the full-precision model's last hidden states (pipeline/tuning.py)."""
    targets = [x.real(x.reference).float() for x in last]
    bar = tqdm(total=tuning[0], desc="tuning end to end", unit="epoch", file=sys.stderr, disable=not progress)
    before, after = tune_blocks(list(blocks), first, targets, *tuning, on_epoch=bar.update)
    bar.set_postfix_str(f"error {before:.3g} -> {after:.3g}")
    bar.close()
    refresh_bits(reports, model)


class BlockStream:
    """What a streamed run does around the block walk (the in-memory run does nothing): load a block's
    weights before it is reached, persist and free it after, and resume where an earlier run stopped."""

    def begin(self, blocks, inputs: list[BlockInput]) -> tuple[int, list[LayerReport]]:
        """(the first block still to do, the reports of those done before); may restore `inputs`."""
        return 0, []

    def load(self, index: int, block: nn.Module) -> None:
        """Give the block its full-precision weights (called again for block 0 after capture: idempotent)."""

    def done(self, index: int, block: nn.Module, reports: list[LayerReport], inputs: list[BlockInput]) -> None:
        """The block is quantised and `inputs` hold its outputs (the next block's inputs)."""

    def layer_done(self) -> None:
        """A Linear was quantised and swapped (its full-precision weight and temporaries are garbage)."""


def quantize_model(model: nn.Module, config_or_recipe, calibration: torch.Tensor | CalibrationSet | None,
                   batch_size: int = 8, progress: bool = True, stream: BlockStream | None = None,
                   distributed: bool = False) -> nn.Module:
    """Quantise `model` in place, block by block, on calibration token ids [n_samples, seq_len] (windows)
    or a CalibrationSet (samples: padded batches with attention masks). stream: loads and saves blocks
    (a model built without its block weights); Linears outside the blocks are then never quantised.
    distributed: share the work among the ranks of the initialised torch.distributed process group
    (pipeline/distributed.py): every rank passes the same arguments and ends with the same model, which
    equals one process's bit for bit at equal threads per process."""
    recipe = as_recipe(config_or_recipe)
    model.eval()
    calibration = CalibrationSet.of(calibration)
    check_context(model, calibration.length if calibration is not None else None)
    if calibration is not None:
        check_token_ids(model, calibration.ids)
    layer_plan(model, recipe)      # every Linear's shape checked before any work
    arch = describe(model)
    path, blocks = block_list(model, arch)
    batches = calibration.batches(batch_size) if calibration is not None else []
    split = current_split(len(batches), distributed)
    if stream is not None and split.world > 1:
        raise LowbitError("a streamed run (--stream, quantize_folder) runs in one process; run it without torchrun, "
                          "or drop --stream")
    batches = split.mine(batches)   # this rank's; their activations never leave it
    walk = stream or BlockStream()
    walk.load(0, blocks[0])
    configs = block_configs(blocks, path, recipe)
    model_tuning = check_tuning(configs, split, stream is not None) if calibration is not None else None
    inputs = capture_block_inputs(model, blocks, batches)
    if tunes(configs):
        keep_reference(inputs)   # tuning aims each block at the full-precision model's own hidden states
    start, reports = walk.begin(blocks, inputs)
    first = [replace(x, reference=None) for x in inputs] if model_tuning else None   # the first block's inputs
    n_gqa = _gqa(model)
    bar = tqdm(range(start, len(blocks)), desc="quantising blocks", unit="block", file=sys.stderr,
               disable=not progress or split.rank != 0, initial=start, total=len(blocks))
    for i in bar:
        block, prefix = blocks[i], f"{path}.{i}"
        walk.load(i, block)
        reference = reference_outputs(block, inputs)   # before any fold or rounding
        scale_block(block, arch, inputs, recipe, prefix, i, split)
        tuning = _block_tuning(block, prefix, recipe, bool(inputs))
        done = _quantize_block(block, prefix, i, inputs, recipe, arch, len(blocks), n_gqa, walk.layer_done, split)
        if tuning:
            targets = [x.real(r).float() for x, r in zip(inputs, reference)]
            before, after = tune_block(block, inputs, targets, *tuning)
            bar.set_postfix_str(f"block {i} tuned: error {before:.3g} -> {after:.3g}")
            del targets
            refresh_bits(done, block, prefix)
        advance(block, inputs, reference)
        walk.done(i, block, done, inputs)
        reports += done
    if model_tuning:
        _tune_end_to_end(blocks, first, inputs, reports, model, model_tuning, progress)
    if stream is None:
        reports += _quantize_outside_blocks(model, arch, path, recipe, batches, len(blocks), split)
    model.lowbit_recipe = recipe
    model.lowbit_report = reports
    model.lowbit_calibration = calibration.describe() if calibration is not None else "calibration: none"
    return model
