"""Running decoder blocks on captured inputs: the plumbing every calibration step shares.

Run the calibration batches up to the first block and keep its inputs (hidden states plus the mask and
position arguments the model passes); then each block can be run on them, and statistics of any of its
Linears' inputs gathered with forward hooks.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.methods.stats import LayerStats


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the first block needs to run."""


@dataclass
class BlockInput:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def model_kwargs(model: nn.Module) -> dict:
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
    extra = model_kwargs(model)
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


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's full-precision Linears by name (already quantised ones are other module types)."""
    return {n: m for n, m in block.named_modules() if type(m) is nn.Linear}


def collect_stats(block: nn.Module, inputs: list[BlockInput], linears: dict[str, nn.Linear],
                  keep_inputs: bool = False) -> dict[str, LayerStats]:
    """LayerStats of each given Linear's input, from one pass of the block over `inputs`."""
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


def advance(block: nn.Module, inputs: list[BlockInput]) -> None:
    """Replace each input's hidden states by the block's output: the next block's inputs."""
    with torch.no_grad():
        for x in inputs:
            x.hidden = run_block(block, x)
