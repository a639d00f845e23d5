"""Running decoder blocks on captured inputs: the plumbing every calibration step shares.

Run the calibration batches up to the first block and keep its inputs (hidden states plus the mask and
position arguments the model passes), and the arguments the model passes every later block (they differ
where layers do: sliding-window and global attention, per-layer rotary tables); then each block can be run
on them, and statistics of any of its Linears' inputs gathered with forward hooks.

Padding is a pipeline concern: a batch of samples (pipeline/samples.py) carries its attention mask, kept
with each captured input as `BlockInput.mask`, and every hook hands LayerStats only the rows of real
tokens (`real_rows`), so no Hessian, channel statistic or block-output error ever sees a padded position.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lowbit.methods.stats import LayerStats, StatsUpdate
from lowbit.pipeline.distributed import Split


class _StopForward(Exception):
    """Raised once the last block is reached: nothing past it needs to run."""


@dataclass
class BlockInput:
    """hidden [b, L, d]; the block's other positional and keyword arguments (attention mask, positions ...)
    as the model passed them; mask: bool [b, L], True at real tokens, None when every position is real;
    calls: each block's (args, kwargs) as the model passes them (blocks differ: sliding-window and global
    layers get different masks and rotary tables), moved on by advance(); reference: [b, L, d], where a run
    keeps it (block fine-tuning), the full-precision model's hidden states at the same place, which
    `hidden` (the quantised blocks' outputs) drifts from."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None = None
    calls: list = field(default_factory=list)
    index: int = 0
    reference: torch.Tensor | None = None

    def real(self, y: torch.Tensor) -> torch.Tensor:
        """The rows of real tokens of y [b, L, ...] (or of [b * L, ...]): [tokens, ...]."""
        return real_rows(y, self.mask)

    def next_block(self) -> None:
        """The arguments of the next block from here on."""
        self.index += 1
        if self.index < len(self.calls):
            self.args, self.kwargs = self.calls[self.index]


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


def _split(args, kwargs) -> tuple[torch.Tensor, tuple, dict]:
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, tuple(args[1:]), kwargs


def capture_block_inputs(model: nn.Module, blocks, batches: list) -> list[BlockInput]:
    """The first block's inputs for each batch (ids [b, L], or (ids, attention mask [b, L])), with the
    arguments the model passes every block. One pass of the model in which the first block runs and the
    others only record their arguments (passing the first block's output on unchanged), up to the last."""
    blocks = list(blocks)
    calls: list = []
    out0: dict = {}

    def first(*args, **kwargs):
        calls.append(_split(args, kwargs))
        out0["value"] = original(*args, **kwargs)
        if len(blocks) == 1:
            raise _StopForward
        return out0["value"]

    def later(i):
        def record(*args, **kwargs):
            hidden, rest, kw = _split(args, kwargs)
            calls.append((hidden, rest, kw))
            if i == len(blocks) - 1:
                raise _StopForward
            value = out0["value"]
            return hidden if isinstance(value, torch.Tensor) else (hidden, *value[1:])
        return record

    original = blocks[0].forward
    for i, block in enumerate(blocks):
        block.forward = first if i == 0 else later(i)
    captured: list[BlockInput] = []
    try:
        with torch.no_grad():
            for batch in batches:
                calls.clear()
                try:
                    run_model(model, batch)
                except _StopForward:
                    pass
                mask = as_batch(batch)[1]
                hidden, args, kwargs = calls[0]
                per_block = [(a, k) for _, a, k in calls] if len(calls) == len(blocks) else []
                captured.append(BlockInput(hidden.detach(), args, kwargs, None if mask is None else mask.bool(),
                                           per_block))
    finally:
        for block in blocks:
            del block.forward
    return captured


def _first_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, x: BlockInput, until: nn.Module | None = None) -> torch.Tensor:
    """The block's output on x; with `until` (a submodule), that module's output, and the block stops
    there: nothing after it runs."""
    if until is None:
        return _first_tensor(block(x.hidden, *x.args, **x.kwargs))
    captured = []

    def stop(module, args, out):
        captured.append(_first_tensor(out))
        raise _StopForward

    handle = until.register_forward_hook(stop)
    try:
        block(x.hidden, *x.args, **x.kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(until).__name__} was not called by the block")
    return captured[0]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's full-precision Linears by name (already quantised ones are other module types)."""
    return {n: m for n, m in block.named_modules() if type(m) is nn.Linear}


def collect_stats(block: nn.Module, inputs: list[BlockInput], linears: dict[str, nn.Linear],
                  keep_inputs: bool = False, split: Split | None = None) -> dict[str, LayerStats]:
    """LayerStats of each given Linear's input, from one pass of the block over `inputs`: real tokens only.
    split: how the run's batches are shared among processes (`inputs` are then this rank's); None: one."""
    return observe_linears(linears, inputs, lambda x: run_block(block, x), BlockInput.real, keep_inputs, split)


def observe_linears(linears: dict[str, nn.Module], items: list, run, rows, keep_inputs: bool = False,
                    split: Split | None = None) -> dict[str, LayerStats]:
    """LayerStats of each Linear's inputs while run(item) runs each of this rank's batches; rows(item, x)
    gives the real-token rows of an input x. Each batch's updates are added in the run's batch order,
    wherever the batch ran (pipeline/distributed.py), so the statistics are the same bits in every rank
    and in one process."""
    split = split or Split(len(items))
    stats = {n: LayerStats(m.in_features, keep_inputs=keep_inputs) for n, m in linears.items()}
    batch: dict = {}

    def observe(n: str, x: torch.Tensor) -> None:
        last = batch["last"]
        # Linears called one after another on one tensor (q/k/v, gate/up) share one update: its x^T x is
        # computed, and sent, once; the same op on the same values gives the same bits anyway
        if last is None or last[0] is not x or last[1] != x._version:
            last = batch["last"] = (x, x._version, StatsUpdate.of(rows(batch["item"], x), keep_inputs))
        batch["sink"](n, last[2])

    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: observe(n, inp[0])) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for r, sources in split.rounds(split.batches):
                updates: dict = {n: [] for n in linears}
                # one process adds as the batch runs (no second copy of the statistics); ranks keep the
                # batch's updates until its turn in the batch order
                sink = (lambda n, u: stats[n].add(u)) if split.world == 1 else (lambda n, u: updates[n].append(u))
                if r < len(items):
                    batch.update(item=items[r], sink=sink, last=None)
                    run(items[r])
                    batch["last"] = None
                for src in sources if split.world > 1 else ():
                    _add_shared(stats, split, updates if src == split.rank else None, src)
    finally:
        for h in handles:
            h.remove()
    return stats


def _add_shared(stats: dict[str, LayerStats], split: Split, updates: dict | None, src: int) -> None:
    """Add rank src's updates of one batch ({name: [StatsUpdate per call]}, an update shared by several
    Linears sent once) to every Linear's stats."""
    sent = None
    if updates is not None:
        unique = list({id(u): u for n in stats for u in updates[n]}.values())
        index = {id(u): i for i, u in enumerate(unique)}
        refs = [len(unique)] + [len(updates[n]) for n in stats] + [index[id(u)] for n in stats for u in updates[n]]
        sent = [torch.tensor(refs, dtype=torch.int64)] + [t for u in unique for t in u.tensors()]
    got = split.share(sent, src)
    refs, tensors = got[0].tolist(), iter(got[1:])
    received = [StatsUpdate.from_tensors(tensors) for _ in range(refs[0])]
    which = iter(refs[1 + len(stats):])
    for n, count in zip(stats, refs[1:1 + len(stats)]):
        for _ in range(count):
            stats[n].add(received[next(which)])


def advance(block: nn.Module, inputs: list[BlockInput], reference: list[torch.Tensor] | None = None) -> None:
    """Replace each input's hidden states by the block's output: the next block's inputs; reference: the
    full-precision block's outputs on the inputs' references (reference_outputs), which become the next
    block's references."""
    with torch.no_grad():
        for j, x in enumerate(inputs):
            x.hidden = run_block(block, x)
            if reference is not None:
                x.reference = reference[j]
            x.next_block()


def keep_reference(inputs: list[BlockInput]) -> None:
    """Start following the full-precision model beside the quantised one: each input's reference is a copy
    of its hidden states (call it before the first block is quantised)."""
    for x in inputs:
        x.reference = x.hidden.clone()


def reference_outputs(block: nn.Module, inputs: list[BlockInput]) -> list[torch.Tensor] | None:
    """The block's outputs [b, L, d] on each input's reference (run it while the block is in full
    precision), or None where the inputs keep no reference."""
    if not inputs or inputs[0].reference is None:
        return None
    with torch.no_grad():
        return [run_block(block, replace(x, hidden=x.reference)) for x in inputs]
