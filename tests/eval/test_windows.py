import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval.windows import model_context, split_windows


def test_window_protocol_counts():
    w = split_windows(torch.arange(1000), 256)
    assert (w.n_windows, w.n_tokens, w.n_scored, w.n_dropped) == (3, 768, 765, 232)
    assert torch.equal(w.ids[1], torch.arange(256, 512))
    assert w.protocol() == ("non-overlapping 256-token windows over 768 held-out tokens (3 windows; the last 232 "
                            "tokens dropped); every token after the first of each window is scored (765 tokens)")


def test_fewer_tokens_than_context_give_one_short_window():
    w = split_windows(torch.arange(50), 256)
    assert (w.n_windows, w.context, w.n_scored, w.n_dropped) == (1, 50, 49, 0)


@pytest.mark.parametrize("ids, context", [(torch.arange(1), 16), (torch.arange(100), 1)])
def test_unscorable_input_is_a_user_error(ids, context):
    with pytest.raises(LowbitError):
        split_windows(ids, context)


def test_default_context_is_model_positions_capped(llama):
    assert model_context(llama) == 256 and model_context(llama, cap=100) == 100
