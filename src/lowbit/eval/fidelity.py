"""Output fidelity against the full-precision model: KL(p_ref || p_quant) and top-1 agreement.

The reference's next-token log-probs are computed once (per compare run) and kept in float32 for the
first windows, up to `max_fidelity_tokens` positions: the full distributions are what KL needs, and
they cost positions x vocabulary x 4 bytes (8192 x 4096 x 4 = 128 MiB for the bundled model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.eval.perplexity import PerplexityResult
from lowbit.eval.scoring import Scores, score_windows
from lowbit.eval.windows import Windows, model_context, split_windows

DEFAULT_MAX_FIDELITY_TOKENS = 8192


@dataclass(frozen=True)
class Reference:
    """What the full-precision model said about the eval windows."""

    windows: Windows
    logprobs: torch.Tensor          # float32 [n_fidelity_windows, context-1, vocab]
    perplexity: PerplexityResult

    @property
    def n_positions(self) -> int:
        return self.logprobs.shape[0] * self.logprobs.shape[1]

    def protocol(self) -> str:
        return (f"KL(p_ref || p) and top-1 agreement of next-token distributions at {self.n_positions} "
                f"positions (the first {self.logprobs.shape[0]} windows)")


@dataclass(frozen=True)
class FidelityResult:
    kl: float             # mean KL(p_ref || p) per position, nats
    top1: float           # fraction of positions where both models' most likely next token agree
    n_positions: int

    @classmethod
    def from_scores(cls, scores: Scores) -> "FidelityResult":
        n = scores.n_compared
        return cls(scores.kl_sum / n if n else math.nan, scores.top1_agree / n if n else math.nan, n)


def fidelity_windows(windows: Windows, max_fidelity_tokens: int) -> int:
    """How many leading windows the reference keeps: at least one, at most max_fidelity_tokens positions."""
    return max(1, min(windows.n_windows, max_fidelity_tokens // (windows.context - 1)))


def build_reference(model, ids: torch.Tensor | Windows, context: int | None = None,
                    max_fidelity_tokens: int = DEFAULT_MAX_FIDELITY_TOKENS, batch_size: int = 8,
                    progress: bool = False) -> Reference:
    """Run the full-precision `model` once: its perplexity on all windows, its log-probs on the first."""
    windows = ids if isinstance(ids, Windows) else split_windows(ids, context or model_context(model))
    n_keep = fidelity_windows(windows, max_fidelity_tokens)
    head = windows.head(n_keep)
    scores, logprobs = score_windows(model, head, batch_size=batch_size, keep_logprobs=True, progress=progress,
                                     desc="reference windows")
    if n_keep < windows.n_windows:
        tail = Windows(windows.ids[n_keep:], windows.context, windows.n_tokens - head.n_tokens)
        rest, _ = score_windows(model, tail, batch_size=batch_size, progress=progress, desc="reference windows")
        scores.add(rest)
    return Reference(windows, logprobs, PerplexityResult.from_scores(scores, windows))


def fidelity(model, reference: Reference, batch_size: int = 8) -> FidelityResult:
    """Mean KL(p_ref || p_model) and top-1 agreement over the reference's kept positions."""
    head = reference.windows.head(reference.logprobs.shape[0])
    scores, _ = score_windows(model, head, reference.logprobs, batch_size=batch_size)
    return FidelityResult.from_scores(scores)
