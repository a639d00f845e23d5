"""Shared by the trainers' resume tests."""
from lowbit.train.loop import causal_lm_loss


def interrupted_at(call: int, fn=causal_lm_loss):
    """`fn` that raises KeyboardInterrupt (a Ctrl-C) on its `call`-th call (1-based), as a user would mid-run."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped
