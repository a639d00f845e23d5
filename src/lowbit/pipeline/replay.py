"""Replaying the part of a block that a scale search does not change.

A search that varies one group of Linears (AWQ's alpha grid) runs the block once per candidate and
batch. Every submodule whose forward *finishes* before the group's first Linear *starts* computes the
same values each time: its inputs come from before the group. `Replay` records those outputs once per
batch, with the block's current weights, and while active returns them instead of recomputing. The block
then performs exactly the remaining operations on exactly the same values, so its output is bit for bit
that of a full run. Modules called again after the group starts, and the children of replayed modules,
are not replayed. Architecture-agnostic: nothing but the order in which modules finish is used.
Replayed tensors are handed out as recorded; if the block ever writes into one (its version counter
moves), the replay is dropped and that batch is run in full again.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.pipeline.blocks import BlockInput, run_block


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


class Replay:
    """`replay.run(i, batches[i])`: the block's output on batch i, replaying what precedes `first`."""

    def __init__(self, block: nn.Module, first: nn.Module, batches: list[BlockInput]):
        self.block, self.batch = block, 0
        self.outputs: dict[nn.Module, list[list]] = {}   # module -> per batch, outputs in call order
        self._record(first, batches)
        self._calls: dict[nn.Module, int] = {}

    def _record(self, first: nn.Module, batches: list[BlockInput]) -> None:
        names = {m: n for n, m in self.block.named_modules() if m is not self.block}
        state = {"started": False, "late": set(), "calls": {}}

        def starts(module, args):
            state["started"] = True

        def finished(module, args, out):
            if state["started"]:
                state["late"].add(module)
            else:
                state["calls"].setdefault(module, []).append(out)

        handles = [first.register_forward_pre_hook(starts)] + [m.register_forward_hook(finished) for m in names]
        per_batch = []
        try:
            with torch.no_grad():
                for x in batches:
                    state["started"], state["calls"] = False, {}
                    run_block(self.block, x)
                    per_batch.append(state["calls"])
        finally:
            for h in handles:
                h.remove()
        early = [m for m in per_batch[0] if m not in state["late"]] if per_batch else []
        kept = {names[m] for m in early}
        for m in early:   # the outermost replayed module stands for its children
            if not any(names[m].startswith(p + ".") for p in kept):
                self.outputs[m] = [calls[m] for calls in per_batch]
        self._versions = self._current_versions()

    def _current_versions(self) -> list[int]:
        return [t._version for per_batch in self.outputs.values() for calls in per_batch for t in _tensors(calls)]

    def _replayed(self, module: nn.Module):
        def forward(*args, **kwargs):
            i = self._calls.get(module, 0)
            self._calls[module] = i + 1
            return self.outputs[module][self.batch][i]
        return forward

    def run(self, batch: int, x: BlockInput) -> torch.Tensor:
        self.batch, self._calls = batch, {}
        for m in self.outputs:
            m.forward = self._replayed(m)   # an instance attribute: nn.Module.__call__ calls it
        try:
            out = run_block(self.block, x)
        finally:
            for m in self.outputs:
                del m.forward
        if self._current_versions() != self._versions:   # the block wrote into a replayed output
            self.outputs, self._versions = {}, []
            out = run_block(self.block, x)
        return out
