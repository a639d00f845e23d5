"""The layer-by-layer pipeline (as GPTQ and llm-compressor do it).

Run the calibration batches up to the first block and keep its inputs; then for each block: gather the
statistics every Linear's method asks for, quantise (group by group when the method is sequential),
and feed the quantised block's outputs to the next. Only one block's activations live at a time.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.methods.stats import LayerStats
from lowbit.nn import QuantLinear
from lowbit.pipeline.arch import Arch, block_list, describe, sequential_groups
from lowbit.pipeline.loading import conv1d_to_linear, set_module
from lowbit.pipeline.recipe import Recipe, as_recipe
from lowbit.pipeline.report import LayerReport, layer_report


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the first block needs to run."""


@dataclass
class BlockInput:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def _model_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor]) -> list[BlockInput]:
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInput(hidden.detach(), tuple(args[1:]), kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    extra = _model_kwargs(model)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids, **extra)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, x: BlockInput) -> torch.Tensor:
    out = block(x.hidden, *x.args, **x.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def collect_stats(block: nn.Module, inputs: list[BlockInput], linears: dict[str, nn.Linear],
                  keep_inputs: bool = False) -> dict[str, LayerStats]:
    stats = {n: LayerStats(m.in_features, keep_inputs=keep_inputs) for n, m in linears.items()}
    handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[n]: s.update(inp[0]))
               for n, m in linears.items()]
    try:
        with torch.no_grad():
            for x in inputs:
                run_block(block, x)
    finally:
        for h in handles:
            h.remove()
    return stats


def quantize_linear(config, full_name: str, module: nn.Linear, stats: LayerStats | None,
                    n_layers: int) -> tuple[nn.Module, LayerReport]:
    cfg = config.for_layer(full_name, n_layers) if hasattr(config, "for_layer") else config
    weight = module.weight.detach().float()
    q = cfg.quantize_weight(weight, stats)
    bias = None if module.bias is None else module.bias.detach()
    new = cfg.make_module(q, bias) if hasattr(cfg, "make_module") else QuantLinear.from_quantized(q, bias)
    return new, layer_report(full_name, cfg.short_name(), weight, q, stats)


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if type(m) is nn.Linear}


def _quantize_block(block, prefix, inputs, recipe: Recipe, arch: Arch, n_layers: int) -> list[LayerReport]:
    linears = _linears(block)
    plan = {n: recipe.config_for(f"{prefix}.{n}") for n in linears}
    todo = [n for n in linears if plan[n] is not None]
    if not todo:
        return []
    sequential = any(getattr(plan[n], "sequential", False) for n in todo)
    groups = sequential_groups(arch, todo) if sequential else [todo]
    keep = any("inputs" in getattr(plan[n], "required_stats", ()) for n in todo)
    reports = []
    for group in groups:
        stats = collect_stats(block, inputs, {n: linears[n] for n in group}, keep)
        for n in group:
            new, rep = quantize_linear(plan[n], f"{prefix}.{n}", linears[n], stats[n], n_layers)
            set_module(block, n, new)
            reports.append(rep)
        del stats
    return reports


def _quantize_outside_blocks(model, blocks_path, recipe, batches, n_layers) -> list[LayerReport]:
    """Linears outside the blocks (an output head a recipe asks for): stats from a full forward pass."""
    linears = {n: m for n, m in _linears(model).items()
               if not n.startswith(blocks_path + ".") and recipe.config_for(n) is not None}
    if not linears:
        return []
    stats = {n: LayerStats(m.in_features) for n, m in linears.items()}
    handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[n]: s.update(inp[0])) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, **_model_kwargs(model))
    finally:
        for h in handles:
            h.remove()
    reports = []
    for n, m in linears.items():
        new, rep = quantize_linear(recipe.config_for(n), n, m, stats[n], n_layers)
        set_module(model, n, new)
        reports.append(rep)
    return reports


def quantize_model(model: nn.Module, config_or_recipe, calibration: torch.Tensor | None,
                   batch_size: int = 8, progress: bool = True) -> nn.Module:
    """Quantise `model` in place, block by block, on calibration token ids [n_samples, seq_len]."""
    recipe = as_recipe(config_or_recipe)
    model.eval()
    conv1d_to_linear(model)
    arch = describe(model)
    path, blocks = block_list(model, arch)
    batches = list(calibration.split(batch_size)) if calibration is not None else []
    inputs = capture_block_inputs(model, blocks[0], batches)
    prepare = getattr(recipe.default, "prepare_block", None)
    reports: list[LayerReport] = []
    bar = tqdm(range(len(blocks)), desc="quantising blocks", unit="block", file=sys.stderr, disable=not progress)
    for i in bar:
        block = blocks[i]
        if prepare is not None:
            prepare(block=block, arch=arch, inputs=inputs, run_block=run_block, block_index=i)
        reports += _quantize_block(block, f"{path}.{i}", inputs, recipe, arch, len(blocks))
        with torch.no_grad():
            for x in inputs:
                x.hidden = run_block(block, x)
    reports += _quantize_outside_blocks(model, path, recipe, batches, len(blocks))
    model.lowbit_recipe = recipe
    model.lowbit_report = reports
    return model
