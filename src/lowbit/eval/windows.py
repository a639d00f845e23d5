"""Cutting held-out token ids into the windows that perplexity and fidelity score."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

# Without a stated context, windows are the model's context capped here, so that a CPU run over the
# default 16K eval tokens stays short; the protocol line always states the context used.
DEFAULT_CONTEXT_CAP = 256


@dataclass(frozen=True)
class Windows:
    """Non-overlapping windows of `context` tokens; the tail shorter than a window is dropped."""

    ids: torch.Tensor          # int64 [n_windows, context]
    context: int
    n_input_tokens: int        # tokens offered, before the tail was dropped

    @property
    def n_windows(self) -> int:
        return self.ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()

    @property
    def n_scored(self) -> int:
        """Every token after the first of each window is predicted from the ones before it."""
        return self.n_windows * (self.context - 1)

    @property
    def n_dropped(self) -> int:
        return self.n_input_tokens - self.n_tokens

    def head(self, n_windows: int) -> "Windows":
        n = min(n_windows, self.n_windows)
        return Windows(self.ids[:n], self.context, n * self.context)

    def protocol(self) -> str:
        dropped = f"; the last {self.n_dropped} tokens dropped" if self.n_dropped else ""
        return (f"non-overlapping {self.context}-token windows over {self.n_tokens} held-out tokens "
                f"({self.n_windows} windows{dropped}); every token after the first of each window is "
                f"scored ({self.n_scored} tokens)")


def model_context(model, cap: int = DEFAULT_CONTEXT_CAP) -> int:
    """The model's context length (max_position_embeddings), capped at `cap`."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(int(n), cap) if n else cap


def split_windows(ids, context: int) -> Windows:
    """Non-overlapping windows of `context` tokens; with fewer tokens than that, one shorter window."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if not isinstance(context, int) or context < 2:
        raise LowbitError(f"context must be an integer of at least 2 tokens, got {context!r}")
    n = ids.numel()
    if n < 2:
        raise LowbitError(f"need at least 2 held-out tokens to score, got {n}")
    context = min(context, n)
    n_windows = n // context
    return Windows(ids[: n_windows * context].reshape(n_windows, context), context, n)
