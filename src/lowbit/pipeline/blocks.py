"""Running decoder blocks on captured inputs: the plumbing every calibration step shares.

Run the calibration batches up to the first block and keep its inputs (hidden states plus the mask and
position arguments the model passes); then each block can be run on them, and statistics of any of its
Linears' inputs gathered with forward hooks.

Padding is a pipeline concern: a batch of samples (pipeline/samples.py) carries its attention mask, kept
with each captured input as `BlockInput.mask`, and every hook hands LayerStats only the rows of real
tokens (`real_rows`), so no Hessian, channel statistic or block-output error ever sees a padded position.
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
    """hidden [b, L, d]; the block's other positional and keyword arguments (attention mask, positions ...)
    as the model passed them; mask: bool [b, L], True at real tokens, None when every position is real."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None = None

    def real(self, y: torch.Tensor) -> torch.Tensor:
        """The rows of real tokens of y [b, L, ...] (or of [b * L, ...]): [tokens, ...]."""
        return real_rows(y, self.mask)


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x [b, L, f] (or [b * L, f]) -> [real tokens, f]: the rows where mask [b, L] is True.

    Inputs that are neither (a mixture-of-experts expert sees only the tokens routed to it) are taken
    whole: their rows cannot be matched to positions here."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask]
    flat = x.reshape(-1, x.shape[-1])
    return flat[mask.reshape(-1)] if flat.shape[0] == mask.numel() else flat


def model_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def as_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids [b, L], attention mask [b, L] or None) from ids or such a pair."""
    return (batch, None) if isinstance(batch, torch.Tensor) else batch


def run_model(model: nn.Module, batch) -> None:
    """The model on one batch (ids, or (ids, attention mask)), without a KV cache."""
    ids, mask = as_batch(batch)
    extra = model_kwargs(model)
    if mask is not None:
        extra["attention_mask"] = mask
    model(input_ids=ids, **extra)


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list) -> list[BlockInput]:
    """The first block's inputs for each batch (ids [b, L], or (ids, attention mask [b, L]))."""
    captured: list[BlockInput] = []
    current = {"mask": None}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInput(hidden.detach(), tuple(args[1:]), kwargs, current["mask"]))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                mask = as_batch(batch)[1]
                current["mask"] = None if mask is None else mask.bool()
                try:
                    run_model(model, batch)
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
    """LayerStats of each given Linear's input, from one pass of the block over `inputs`: real tokens only."""
    stats = {n: LayerStats(m.in_features, keep_inputs=keep_inputs) for n, m in linears.items()}
    current: dict = {"x": None}
    handles = [m.register_forward_hook(lambda mod, inp, out, s=stats[n]: s.update(current["x"].real(inp[0])))
               for n, m in linears.items()]
    try:
        with torch.no_grad():
            for x in inputs:
                current["x"] = x
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
