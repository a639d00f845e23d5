"""Block fine-tuning: after a block's Linears are quantised, train what is continuous in it so that its
output comes back to the full-precision block's, on the calibration inputs (AQLM, Egiazarian et al.,
2024, section 3.3; QuIP#'s fine-tuning, Tseng et al., 2024, section 5, does the same within a block).

What trains: the float32 masters the quantised modules hand out (`tuning_start()`: AQLM's codebooks and
row scales, QuIP#'s matrix scale; their discrete codes stay fixed) and the block's own floating-point
parameters (norms, biases, Linears left in full precision). The targets are the block's outputs before
it was quantised, on the same inputs: the outputs of the already-quantised blocks before it, so the
tuning also makes up for their error, as the paper's does. Adam over the calibration batches, one step
per batch, `epochs` passes, on the relative squared error at real tokens. The tuned values are stored
in the modules' own precision (`tuning_end()`: fp16 codebooks; it returns a function that undoes it), and
kept only if the block's error with them, measured in that precision, is below the untuned block's: tuning
never makes a block worse on its calibration data.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.pipeline.blocks import BlockInput, run_block


def block_targets(block: nn.Module, inputs: list[BlockInput]) -> list[torch.Tensor]:
    """The block's outputs at real tokens [tokens, hidden] per batch, float32: what tuning aims for."""
    with torch.no_grad():
        return [x.real(run_block(block, x)).float() for x in inputs]


def block_error(block: nn.Module, inputs: list[BlockInput], targets: list[torch.Tensor]) -> float:
    """sum over batches of ||y - target||^2 / ||target||^2 at real tokens."""
    with torch.no_grad():
        return sum(_relative(x.real(run_block(block, x)), t).item() for x, t in zip(inputs, targets))


def _relative(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (y.float() - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-30)


def _tunable(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if hasattr(m, "tuning_start")]


def tune_block(block: nn.Module, inputs: list[BlockInput], targets: list[torch.Tensor], epochs: int,
               lr: float) -> tuple[float, float]:
    """Tune the block in place (module docstring); returns (error before, error after), the relative
    squared errors summed over the batches, after <= before."""
    before = block_error(block, inputs, targets)
    modules = _tunable(block)
    params = [p for p in block.parameters() if p.dtype == torch.float32]
    if epochs <= 0 or not inputs or not (modules or params):
        return before, before
    snapshot = {k: v.clone() for k, v in block.state_dict().items()}
    grads = [p.requires_grad for p in params]
    masters = [t for m in modules for t in m.tuning_start()]
    opt = torch.optim.Adam(masters + params, lr=lr)
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(epochs):
                for x, t in zip(inputs, targets):
                    opt.zero_grad(set_to_none=True)
                    loss = _relative(x.real(run_block(block, x)), t)
                    loss.backward()
                    opt.step()
    finally:
        for p, g in zip(params, grads):
            p.requires_grad_(g)
            p.grad = None
        with torch.no_grad():
            undo = [m.tuning_end() for m in modules]
    after = block_error(block, inputs, targets)
    if not after < before:   # in the stored precision it did not help: the block as quantised
        with torch.no_grad():
            for u in undo:
                u()
            block.load_state_dict(snapshot)
        after = before
    return before, after
