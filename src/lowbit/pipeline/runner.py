"""The layer-by-layer pipeline (as GPTQ and llm-compressor do it).

Run the calibration batches up to the first block and keep its inputs; then for each block: fold the
input scales the recipe's scaling methods choose (pipeline/scaling.py), gather the statistics every
Linear's method asks for, quantise (group by group when the method is sequential), swap in the module nn/
picks for the weight, and feed the quantised block's outputs to the next. Only one block's activations
live at a time.
"""
from __future__ import annotations

import sys

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
                                    collect_stats, real_rows, run_model)
from lowbit.pipeline.loading import conv1d_to_linear, set_module
from lowbit.pipeline.report import LayerReport, layer_report
from lowbit.pipeline.samples import CalibrationSet
from lowbit.pipeline.scaling import scale_block


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
                    n_layers: int, n_gqa: int) -> list[LayerReport]:
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
        stats = collect_stats(block, inputs, {n: linears[n] for n in group}, keep)
        for n in group:
            info = LayerInfo(f"{prefix}.{n}", arch.roles.get(n), index, n_layers, n_gqa)
            new, rep = quantize_linear(plan[n], info, linears[n], stats[n])
            set_module(block, n, new)
            reports.append(rep)
        del stats
    return reports


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


def _quantize_outside_blocks(model, arch: Arch, blocks_path, recipe, batches, n_layers) -> list[LayerReport]:
    """Linears outside the blocks (an output head a recipe asks for): stats from a full forward pass."""
    linears = {n: m for n, m in _linears(model).items()
               if not n.startswith(blocks_path + ".") and recipe.config_for(n) is not None}
    if not linears:
        return []
    stats = {n: LayerStats(m.in_features) for n, m in linears.items()}
    current: dict = {"mask": None}
    handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[n]: s.update(real_rows(inp[0], current["mask"])))
               for n, m in linears.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                mask = as_batch(batch)[1]
                current["mask"] = None if mask is None else mask.bool()
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    reports = []
    for n, m in linears.items():
        info = LayerInfo(n, arch.globals.get(n), None, n_layers, _gqa(model))
        new, rep = quantize_linear(recipe.config_for(n), info, m, stats[n])
        set_module(model, n, new)
        reports.append(rep)
    return reports


def layer_plan(model: nn.Module, config_or_recipe) -> tuple[dict, list[list[str]]]:
    """Before any work: ({Linear name: (its config for that layer, LayerInfo)} for every Linear the recipe
    quantises, [the names of each group of Linears that share an input]). Reads shapes only."""
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
    return plan, shared_input_groups(model)


def planned_weights(model: nn.Module, config_or_recipe) -> tuple[dict, list[list[str]]]:
    """({Linear name: placeholder of the weight its config will produce}, fused groups), for checks that
    must run before calibration (engine limits)."""
    plan, groups = layer_plan(model, config_or_recipe)
    shapes = dict(model.named_modules())
    out = {n: cfg.planned_weight(shapes[n].weight.shape, info) for n, (cfg, info) in plan.items()}
    return {n: w for n, w in out.items() if w is not None}, groups


def quantize_model(model: nn.Module, config_or_recipe, calibration: torch.Tensor | CalibrationSet | None,
                   batch_size: int = 8, progress: bool = True) -> nn.Module:
    """Quantise `model` in place, block by block, on calibration token ids [n_samples, seq_len] (windows)
    or a CalibrationSet (samples: padded batches with attention masks)."""
    recipe = as_recipe(config_or_recipe)
    model.eval()
    conv1d_to_linear(model)
    arch = describe(model)
    path, blocks = block_list(model, arch)
    calibration = CalibrationSet.of(calibration)
    batches = calibration.batches(batch_size) if calibration is not None else []
    inputs = capture_block_inputs(model, blocks[0], batches)
    reports: list[LayerReport] = []
    n_gqa = _gqa(model)
    bar = tqdm(range(len(blocks)), desc="quantising blocks", unit="block", file=sys.stderr, disable=not progress)
    for i in bar:
        block, prefix = blocks[i], f"{path}.{i}"
        scale_block(block, arch, inputs, recipe, prefix, i)
        reports += _quantize_block(block, prefix, i, inputs, recipe, arch, len(blocks), n_gqa)
        advance(block, inputs)
    reports += _quantize_outside_blocks(model, arch, path, recipe, batches, len(blocks))
    model.lowbit_recipe = recipe
    model.lowbit_report = reports
    model.lowbit_calibration = calibration.describe() if calibration is not None else "calibration: none"
    return model
