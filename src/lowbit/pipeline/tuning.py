"""Block fine-tuning: after a block's Linears are quantised, train what is continuous in it so that its
output comes back to the full-precision block's, on the calibration inputs (AQLM, Egiazarian et al.,
2024, section 3.3; QuIP#'s fine-tuning, Tseng et al., 2024, section 5, does the same within a block).

What trains: the float32 masters the quantised modules hand out (`tuning_start()`: AQLM's codebooks and
row scales, QuIP#'s signs and scale; their discrete codes stay fixed) and the block's own floating-point
parameters (norms, biases, Linears left in full precision). The targets are the full-precision model's own
hidden states at the block's output (the run keeps them beside the quantised ones: BlockInput.reference),
while the block's inputs are the already-quantised blocks' outputs, so tuning also makes up for the error
the blocks before it left (on all-MiniLM-L6-v2 at 2 bits, quip-ft8: mean cosine 0.9029, against 0.8978
when the target is the full-precision block on the quantised inputs; both without held-out batches).
Adam, one step per training batch, `epochs` passes, on the relative squared error at real tokens; every
8th calibration batch is held out
(held_out), as the papers hold out a validation set, and the epoch with the least held-out error is the
one kept (early stopping). The tuned values are stored in the modules' own precision (`tuning_end()`:
fp16 codebooks; it returns a function that undoes it), and kept only if the held-out error with them,
measured in that precision, is below the untuned block's: tuning never makes a block worse on data it did
not train on.

`tune_blocks` does the same for every block at once, end to end (the e2e word): from the first block's
inputs to the full-precision model's last hidden states.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lowbit.pipeline.blocks import BlockInput, run_block

HELD_OUT_EVERY = 8


def tunes(configs) -> bool:
    """Whether any of the method configs asks for fine-tuning, of blocks (ftN) or end to end (e2eN)."""
    return any(c.block_tuning[0] > 0 or c.model_tuning[0] > 0 for c in configs)


def block_targets(block: nn.Module, inputs: list[BlockInput]) -> list[torch.Tensor]:
    """The block's outputs at real tokens [tokens, hidden] per batch, float32, on the inputs as they are."""
    with torch.no_grad():
        return [x.real(run_block(block, x)).float() for x in inputs]


def block_error(block: nn.Module, inputs: list[BlockInput], targets: list[torch.Tensor]) -> float:
    """sum over batches of ||y - target||^2 / ||target||^2 at real tokens."""
    return _error(lambda x: run_block(block, x), inputs, targets)


def _relative(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (y.float() - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-30)


def _tunable(modules: list[nn.Module]) -> list[nn.Module]:
    return [m for block in modules for m in block.modules() if hasattr(m, "tuning_start")]


def tune_block(block: nn.Module, inputs: list[BlockInput], targets: list[torch.Tensor], epochs: int,
               lr: float) -> tuple[float, float]:
    """Tune the block in place (module docstring); returns (error before, error after), the relative
    squared errors summed over the held-out batches (held_out; every batch's when there is one), after <=
    before."""
    return _tune([block], lambda x: run_block(block, x), inputs, targets, epochs, lr)


def run_blocks(blocks: list[nn.Module], x: BlockInput) -> torch.Tensor:
    """The blocks one after another on x (the first block's input): the last block's output [b, L, d]."""
    x = replace(x)   # its own index and arguments; x itself is left as it was
    for block in blocks:
        x.hidden = run_block(block, x)
        x.next_block()
    return x.hidden


def tune_blocks(blocks: list[nn.Module], inputs: list[BlockInput], targets: list[torch.Tensor], epochs: int,
                lr: float, on_epoch=lambda: None) -> tuple[float, float]:
    """End-to-end tuning (QuIP#'s second stage, Tseng et al., 2024, section 5; AQLM's global fine-tuning):
    every block's continuous parts at once, from the first block's inputs to the full-precision model's
    output of the last block (targets: its real-token rows per batch), kept only if that error falls, as
    tune_block. on_epoch() is called after each epoch (progress). Returns (error before, error after)."""
    return _tune(blocks, lambda x: run_blocks(blocks, x), inputs, targets, epochs, lr, on_epoch)


def _error(run, inputs: list[BlockInput], targets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(_relative(x.real(run(x)), t).item() for x, t in zip(inputs, targets))


def held_out(n: int) -> list[int]:
    """Which of n calibration batches tuning holds out to judge itself (every 8th, from the 8th; the last
    one when there are fewer than 8; none of 1): the paper's validation split, so that a tuning that only
    fits the batches it trains on is not kept."""
    if n < 2:
        return []
    return list(range(HELD_OUT_EVERY - 1, n, HELD_OUT_EVERY)) or [n - 1]


def _tune(blocks: list[nn.Module], run, inputs, targets, epochs: int, lr: float,
          on_epoch=lambda: None) -> tuple[float, float]:
    """Adam over the training batches, the epoch with the least held-out error kept (early stopping);
    returns the held-out error (every batch's when there is one batch) before and after."""
    judge = held_out(len(inputs))
    train = [k for k in range(len(inputs)) if k not in judge]
    judge = judge or train
    valid = ([inputs[k] for k in judge], [targets[k] for k in judge])
    before = _error(run, *valid)
    modules = _tunable(blocks)
    params = [p for b in blocks for p in b.parameters() if p.dtype == torch.float32]
    if epochs <= 0 or not inputs or not (modules or params):
        return before, before
    grads = [p.requires_grad for p in params]
    masters = [t for m in modules for t in m.tuning_start()]
    trained = masters + params
    opt = torch.optim.Adam(trained, lr=lr)
    # the untuned values: the modules' own undo puts back what they store, these the float parameters
    start = [t.detach().clone() for t in trained]
    best, best_values = before, start
    interrupted = False
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(epochs):
            with torch.enable_grad():
                for k in train:
                    opt.zero_grad(set_to_none=True)
                    loss = _relative(inputs[k].real(run(inputs[k])), targets[k])
                    loss.backward()
                    opt.step()
            err = _error(run, *valid)
            if err < best:
                best, best_values = err, [t.detach().clone() for t in trained]
            on_epoch()
    except BaseException:
        interrupted, best_values = True, start
        raise
    finally:
        with torch.no_grad():
            for t, v in zip(trained, best_values):
                t.copy_(v)
        for p, g in zip(params, grads):
            p.requires_grad_(g)
            p.grad = None
        with torch.no_grad():
            undo = [m.tuning_end() for m in modules]
            if interrupted:   # the blocks as they were, stored as before (QuIP#'s signs as bits)
                for u in undo:
                    u()
    after = _error(run, *valid)
    if not after < before:   # in the stored precision it did not help: the blocks as they were
        with torch.no_grad():
            for u in undo:
                u()
            for p, v in zip(params, start[len(masters):]):
                p.copy_(v)
        after = before
    return before, after
