"""Replay (pipeline/replay.py): a scale search's block run that replays what precedes the searched group
must give the block's output bit for bit, whatever the group's weights are now. The reference is a plain
run of the block (run_block) with the same weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.pipeline.arch import block_list, describe
from lowbit.pipeline.blocks import BlockInput, block_linears, capture_block_inputs, run_block
from lowbit.pipeline.replay import Replay
from tests.conftest import build_tiny_model, module_output

FAMILIES = ["llama", "qwen2", "gpt2", "opt", "phi3", "gemma2", "bert"]


def _batches(model, n=3):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 200, (2, 16), generator=g) for _ in range(n)]
    _, blocks = block_list(model, describe(model))
    return blocks[0], capture_block_inputs(model, blocks[:1], ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_block_equals_a_full_run_for_every_first_linear(family, one_thread):
    model = build_tiny_model(family).eval()
    block, inputs = _batches(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, linear in block_linears(block).items():
            replay = Replay(block, linear, inputs)
            held = linear.weight.data
            try:
                linear.weight.data = held + 0.05 * torch.randn(held.shape, generator=g)   # a search's candidate
                for i, x in enumerate(inputs):
                    assert torch.equal(replay.run(i, x), run_block(block, x)), (family, name, i)
            finally:
                linear.weight.data = held


def test_the_attention_and_mlp_are_replayed_down_to_their_last_linear(one_thread):
    """o_proj's output is the attention's, down_proj's the MLP's: their searches skip the attention /
    the MLP's first half. q_proj is followed by k/v and the attention itself: nothing to skip there."""
    model = build_tiny_model("llama").eval()
    block, inputs = _batches(model)
    tails = {name: Replay(block, linear, inputs).tail for name, linear in block_linears(block).items()}
    assert tails["self_attn.o_proj"][0] is block.self_attn
    assert tails["mlp.down_proj"][0] is block.mlp
    assert tails["self_attn.q_proj"] is None and tails["mlp.gate_proj"] is None


class _Returns(nn.Module):
    """A parent whose output holds its last Linear's output and something computed from it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return y, y.abs().sum(-1)


class _Keeps(_Returns):
    """A parent that returns its last Linear's output and keeps a statistic of it the block reads."""

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        self.norm = y.norm()
        return y


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = self.b(x)
        return y, {"aux": y.abs().sum(-1)}


class _Reads(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        if isinstance(self.inner, _Keeps):
            return (out * self.inner.norm,)
        y, extra = out
        return (y * (extra["aux"] if isinstance(extra, dict) else extra)[..., None],)


@pytest.mark.parametrize("inner", [_Returns, _Keeps, _DictOut], ids=["tuple-output", "keeps-state", "dict-output"])
def test_a_parent_doing_more_than_its_last_linear_is_run_in_full(inner, one_thread):
    torch.manual_seed(0)
    block = _Reads(inner())
    inputs = [BlockInput(torch.randn(2, 4, 8), (), {}) for _ in range(3)]
    replay = Replay(block, block.inner.b, inputs)
    assert replay.tail is None
    with torch.no_grad():
        block.inner.b.weight.data += 0.1
        for i, x in enumerate(inputs):
            assert torch.equal(replay.run(i, x), run_block(block, x))


# ---------------------------------------------------------------------------------------------------
# Stopping at a submodule (AWQ's "module" objective judges a group by the attention's / the MLP's output)

@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_error_scopes_are_the_smallest_module_holding_the_group(family):
    from lowbit.pipeline.fold import foldable_groups
    from lowbit.pipeline.loading import conv1d_to_linear
    from lowbit.pipeline.scaling import error_scope
    model = build_tiny_model(family).eval()
    conv1d_to_linear(model)   # GPT-2's Conv1D, as the pipeline sees it
    block, _ = _batches(model, 1)
    groups = [g for g, _ in foldable_groups(block, describe(model), list(block_linears(block)))]
    assert groups
    modules = dict(block.named_modules())
    for g in groups:
        scope = error_scope(block, g, "module")
        name = next(n for n, m in modules.items() if m is scope)
        # every Linear of the group sits in it, and it is not a Linear (a lone o_proj is judged by the attention)
        assert all(n.startswith(name + ".") for n in g) and not isinstance(scope, nn.Linear), (g, name)
        assert error_scope(block, g, "block") is None
    if family == "llama":
        scopes = {tuple(g): error_scope(block, g, "module") for g in groups}
        assert scopes[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")] is block.self_attn
        assert scopes[("mlp.gate_proj", "mlp.up_proj")] is block.mlp


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_stopping_at_a_module_gives_its_output_and_runs_nothing_after_it(family, one_thread):
    model = build_tiny_model(family).eval()
    block, inputs = _batches(model)
    linears = block_linears(block)
    first_name = next(iter(linears))
    attn = block.get_submodule(first_name.rsplit(".", 1)[0])   # the attention holds the block's first Linear
    last = list(linears.values())[-1]                          # the MLP's last Linear runs after it
    calls = []
    h = last.register_forward_pre_hook(lambda m, a: calls.append(1))
    g = torch.Generator().manual_seed(2)
    try:
        with torch.no_grad():
            replay = Replay(block, linears[first_name], inputs)
            held = linears[first_name].weight.data
            linears[first_name].weight.data = held + 0.05 * torch.randn(held.shape, generator=g)
            for i, x in enumerate(inputs):
                calls.clear()
                got = replay.run(i, x, until=attn)
                assert not calls
                assert torch.equal(got, run_block(block, x, until=attn))
                assert torch.equal(got, module_output(block, attn, x))
            linears[first_name].weight.data = held
    finally:
        h.remove()
