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

When the group's first Linear is the last thing its enclosing module does (its output *is*, by identity,
the module's output, and the module returns nothing else but Nones, as o_proj's is the attention's and
down_proj's the MLP's), that module is replayed too: it becomes the Linear applied to its recorded input,
put back into the recorded output. Its input comes from before the group, so this is again exactly the
remaining operations on the same values, and the attention (rotary embedding, softmax) is not recomputed
for every candidate of o_proj's search. What the module might do after the Linear besides returning its
output (keep state that the block reads later) would be skipped: so the tail is kept only when replaying
with it reproduces every recorded batch's block output bit for bit.
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
        ancestors = [m for m in names if names.get(first, "").startswith(names[m] + ".")]
        tail = _TailRecorder(first, ancestors)
        handles += tail.hooks()
        per_batch, full = [], []
        try:
            with torch.no_grad():
                for x in batches:
                    state["started"], state["calls"] = False, {}
                    tail.next_batch()
                    full.append(run_block(self.block, x))
                    per_batch.append(state["calls"])
        finally:
            for h in handles:
                h.remove()
        self.tail = tail.result(len(batches))
        early = [m for m in per_batch[0] if m not in state["late"]] if per_batch else []
        kept = {names[m] for m in early} | ({names[self.tail[0]]} if self.tail else set())
        for m in early:   # the outermost replayed module stands for its children
            if not any(names[m].startswith(p + ".") for p in kept):
                self.outputs[m] = [calls[m] for calls in per_batch]
        self._versions = self._current_versions()
        if self.tail is not None and not self._tail_checks(batches, full):
            self.tail = None
            self._versions = self._current_versions()

    def _tail_checks(self, batches: list[BlockInput], full: list[torch.Tensor]) -> bool:
        """Whether replaying with the tail gives every batch's recorded output bit for bit (weights as
        recorded): a parent that does more after its last Linear than return it (keeps state the block
        reads later, say) is caught here and run in full instead."""
        with torch.no_grad():
            return all(torch.equal(self.run(i, x), y) for i, (x, y) in enumerate(zip(batches, full)))

    def _current_versions(self) -> list[int]:
        tail = [] if self.tail is None else [t for r in self.tail[2] for t in _tensors(list(r[0]) + list(r[1].values()))]
        return [t._version for per_batch in self.outputs.values() for calls in per_batch for t in _tensors(calls)] + [
            t._version for t in tail]

    def _tail_forward(self):
        _, first, records = self.tail

        def forward(*args, **kwargs):
            f_args, f_kwargs, out, old = records[self.batch]
            return _substitute(out, old, first(*f_args, **f_kwargs))
        return forward

    def _replayed(self, module: nn.Module):
        def forward(*args, **kwargs):
            i = self._calls.get(module, 0)
            self._calls[module] = i + 1
            return self.outputs[module][self.batch][i]
        return forward

    def run(self, batch: int, x: BlockInput, until: nn.Module | None = None) -> torch.Tensor:
        """The block's output on batch i (or the output of its submodule `until`, see run_block)."""
        self.batch, self._calls = batch, {}
        for m in self.outputs:
            m.forward = self._replayed(m)   # an instance attribute: nn.Module.__call__ calls it
        if self.tail is not None:
            self.tail[0].forward = self._tail_forward()
        try:
            out = run_block(self.block, x, until)
        finally:
            for m in self.outputs:
                del m.forward
            if self.tail is not None:
                del self.tail[0].forward
        if self._current_versions() != self._versions:   # the block wrote into a replayed output
            self.outputs, self.tail, self._versions = {}, None, []
            out = run_block(self.block, x, until)
        return out


def _substitute(out, old, new):
    """`out` with the object `old` (by identity) replaced by `new`, tuples and lists rebuilt."""
    if out is old:
        return new
    if isinstance(out, (tuple, list)):
        items = [_substitute(o, old, new) for o in out]
        return type(out)._make(items) if hasattr(type(out), "_make") else type(out)(items)   # namedtuples
    return out


def _only_holds(out, tensor: torch.Tensor) -> bool:
    """Whether `out` is `tensor` itself, or tuples / lists of it once and Nones: nothing else the parent
    computed (possibly from the tensor) that a replay would hand out stale."""
    def leaves(o):
        if isinstance(o, (tuple, list)):
            return [x for i in o for x in leaves(i)]
        return [] if o is None else [o]
    found = leaves(out)
    return len(found) == 1 and found[0] is tensor


class _TailRecorder:
    """Finds the outermost module enclosing `first` whose output holds first's output tensor itself (first
    called once in it, nothing written into that tensor or first's inputs afterwards), with, per batch,
    first's inputs and the module's output."""

    def __init__(self, first: nn.Module, ancestors: list[nn.Module]):
        self.first, self.ancestors = first, ancestors
        self.ok = {m: True for m in ancestors}
        self.batches: list[dict] = []

    def hooks(self) -> list:
        hs = [self.first.register_forward_hook(self._first_done, with_kwargs=True)]
        return hs + [m.register_forward_hook(self._done(m)) for m in self.ancestors]

    def next_batch(self) -> None:
        self.batches.append({"calls": 0, "outs": {}})

    def _first_done(self, module, args, kwargs, out):
        b = self.batches[-1]
        b["calls"] += 1
        b["first"] = (args, kwargs, out, [t._version for t in _tensors(list(args) + list(kwargs.values()) + [out])])

    def _done(self, parent):
        def hook(module, args, out):
            b = self.batches[-1]
            # first's output must be all the module returns: anything else may have been computed from it
            if b["calls"] != 1 or not _only_holds(out, b["first"][2]):
                self.ok[parent] = False
                return
            f_args, f_kwargs, f_out, versions = b["first"]
            now = [t._version for t in _tensors(list(f_args) + list(f_kwargs.values()) + [f_out])]
            self.ok[parent] = self.ok[parent] and now == versions
            b["outs"][parent] = out
        return hook

    def result(self, n: int):
        """(parent, first, [(args, kwargs, parent output, first output)] per batch), or None."""
        for parent in self.ancestors:   # named_modules order: outermost first
            if self.ok[parent] and n and all(parent in b["outs"] for b in self.batches):
                return parent, self.first, [(b["first"][0], b["first"][1], b["outs"][parent], b["first"][2])
                                            for b in self.batches]
        return None
