"""Perplexity on held-out text: exp of the mean next-token NLL over non-overlapping windows."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.eval.scoring import Scores, score_windows
from lowbit.eval.windows import Windows, model_context, split_windows


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float           # mean NLL per scored token, nats
    n_scored: int
    context: int
    n_windows: int
    protocol: str

    @classmethod
    def from_scores(cls, scores: Scores, windows: Windows) -> "PerplexityResult":
        nll = scores.nll_sum / scores.n_scored
        return cls(math.exp(nll), nll, scores.n_scored, windows.context, windows.n_windows, windows.protocol())


def perplexity(model, ids: torch.Tensor, context: int | None = None, batch_size: int = 8) -> PerplexityResult:
    """Perplexity of `model` on token `ids` cut into non-overlapping windows of `context` tokens
    (default: the model's max_position_embeddings, capped; see windows.DEFAULT_CONTEXT_CAP)."""
    windows = split_windows(ids, context or model_context(model))
    scores, _ = score_windows(model, windows, batch_size=batch_size)
    return PerplexityResult.from_scores(scores, windows)
