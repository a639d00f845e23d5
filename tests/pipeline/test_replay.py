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
from tests.conftest import build_tiny_model

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
