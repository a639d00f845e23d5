"""The scaling step: for every group of Linears whose configs rescale input channels (AWQ, SmoothQuant;
methods/scaling.py), ask the method for the scales and fold them into the producer (pipeline/fold.py).

It runs for whichever config the recipe gives a group, default or override alike: a group takes the
first InputScaling config among its Linears'.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from lowbit.methods.recipe import Recipe, as_recipe
from lowbit.methods.scaling import InputScaling, ScaleContext
from lowbit.pipeline.arch import Arch, block_list, describe
from lowbit.pipeline.blocks import (
    BlockInput,
    advance,
    block_linears,
    capture_block_inputs,
    collect_stats,
    run_block,
)
from lowbit.pipeline.distributed import Split
from lowbit.pipeline.fold import InputSource, fold_scales, foldable_groups
from lowbit.pipeline.loading import conv1d_to_linear
from lowbit.pipeline.replay import Replay
from lowbit.pipeline.samples import CalibrationSet


def _scaling_plan(block: nn.Module, arch: Arch, recipe: Recipe, prefix: str):
    """[(config, group, source)] for the block's foldable groups whose configs rescale inputs."""
    plan = []
    for group, source in foldable_groups(block, arch, list(block_linears(block))):
        configs = [recipe.config_for(f"{prefix}.{n}") for n in group]
        config = next((c for c in configs if isinstance(c, InputScaling)), None)
        if config is not None:
            plan.append((config, group, source))
    return plan


def error_scope(block: nn.Module, group: list[str], scope: str) -> nn.Module | None:
    """Whose output a group's search judges: None for the block's ("block"), or for "module" the smallest
    submodule holding every Linear of the group above the Linears themselves (q/k/v or a lone o_proj ->
    the attention, gate/up or down_proj -> the MLP; AutoAWQ's module2inspect), None when that is the
    block itself."""
    if scope == "block":
        return None
    common = os.path.commonprefix([n.split(".")[:-1] for n in group])
    return block.get_submodule(".".join(common)) if common else None


def _block_error(block, batches, targets, linears: list[nn.Linear], approx: list[torch.Tensor],
                 replay: Replay, split: Split, until: nn.Module | None = None) -> float:
    """Squared error of the block's outputs (or of its submodule `until`'s) at real tokens against
    `targets` (their float64 rows) with the Linears' weights set to `approx`, summed in the run's batch
    order over every rank's batches (this rank's are `batches`). What precedes the Linears is replayed,
    not recomputed; with `until`, nothing after that module runs."""
    held = [m.weight.data for m in linears]
    try:
        for m, w in zip(linears, approx):
            m.weight.data = w
        with torch.no_grad():
            # real tokens only: a padded position's output is never used, so its error must not count
            errors = [float((x.real(replay.run(i, x, until)).double() - t).pow(2).sum())
                      for i, (x, t) in enumerate(zip(batches, targets))]
    finally:
        for m, w in zip(linears, held):
            m.weight.data = w
    return sum(split.in_order(errors))


def _context(block, linears, group, source: InputSource, stats, batches, targets, seed, split,
             until: nn.Module | None = None) -> ScaleContext:
    mods = [linears[n] for n in group]
    error = None
    if targets is not None:
        replay = []   # recorded on the first call, with the weights the block has then

        def error(approx, mods=mods):
            if not replay:
                replay.append(Replay(block, mods[0], batches))
            return _block_error(block, batches, targets, mods, approx, replay[0], split, until)
    return ScaleContext([m.weight.detach() for m in mods], stats, source.index, source.width, source.kind, error,
                        seed)


@torch.no_grad()
def scale_block(block: nn.Module, arch: Arch, inputs: list[BlockInput], recipe: Recipe, prefix: str,
                block_index: int = 0, split: Split | None = None) -> None:
    """Search and fold the input scales of every group of the block whose config asks for them. split:
    how the run's batches are shared among processes (`inputs` are then this rank's); every rank makes the
    same search on the same shared statistics and errors, and folds the same scales."""
    split = split or Split(len(inputs))
    plan = _scaling_plan(block, arch, recipe, prefix)
    linears = block_linears(block)
    for config in dict.fromkeys(c for c, _, _ in plan):
        mine = [(g, s) for c, g, s in plan if c == config]
        part = split.head(config.scale_search_batches)   # the run's first batches
        batches = list(inputs[:part.local])
        if not part.batches:
            continue
        stats = collect_stats(block, batches, {g[0]: linears[g[0]] for g, _ in mine}, config.keeps_inputs, part)
        scopes = {tuple(g): error_scope(block, g, config.error_scope) for g, _ in mine}
        # every target from the full-precision weights, before any fold (a fold keeps the function only
        # up to rounding)
        targets = {m: [x.real(run_block(block, x, m)).double() for x in batches]
                   for m in dict.fromkeys(scopes.values())} if config.uses_block_error else None
        for group, source in mine:
            if stats[group[0]].n_tokens == 0:
                continue
            until = scopes[tuple(group)]
            ctx = _context(block, linears, group, source, stats[group[0]], batches,
                           None if targets is None else targets[until], block_index, part, until)
            s = config.input_scales(ctx)
            if s is not None:
                fold_scales(source, [linears[n] for n in group], s)


def prepare_model(model: nn.Module, config, calibration, batch_size: int = 8) -> nn.Module:
    """Run only the scaling step of a config (or recipe) over every block, without quantising: the model
    keeps its full-precision weights, with the scales folded in. calibration: ids [n, L] or a
    CalibrationSet."""
    recipe = as_recipe(config)
    model.eval()
    conv1d_to_linear(model)
    arch = describe(model)
    path, blocks = block_list(model, arch)
    inputs = capture_block_inputs(model, blocks, CalibrationSet.of(calibration).batches(batch_size))
    for i, block in enumerate(blocks):
        scale_block(block, arch, inputs, recipe, f"{path}.{i}", i)
        advance(block, inputs)
    return model
