"""One pass of a model over scoring windows: next-token NLL, and KL / top-1 against a reference.

Perplexity and fidelity share this pass, so `evaluate` runs the model over the held-out text once.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowbit.eval.windows import Windows


@dataclass
class Scores:
    nll_sum: float = 0.0       # summed -log p(token) over scored tokens (nats)
    n_scored: int = 0
    kl_sum: float = 0.0        # summed KL(p_ref || p) over compared positions (nats)
    top1_agree: int = 0        # compared positions whose arg-max token matches the reference's
    n_compared: int = 0

    def add(self, other: "Scores") -> None:
        self.nll_sum += other.nll_sum
        self.n_scored += other.n_scored
        self.kl_sum += other.kl_sum
        self.top1_agree += other.top1_agree
        self.n_compared += other.n_compared


@torch.inference_mode()
def next_token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """float32 [batch, L-1, vocab]: log p(next token | prefix) at every position but the last."""
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def token_nll_sum(logprobs: torch.Tensor, ids: torch.Tensor) -> float:
    """-sum log p(ids[:, t+1]) for log-probs predicting positions 1..L-1 of `ids`."""
    targets = ids[:, 1:].unsqueeze(-1)
    return float(-logprobs.gather(-1, targets).sum(dtype=torch.float64))


def kl_per_position(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) over the last (vocabulary) axis, summed in float64; tokens with p_ref = 0 add 0.

    The terms stay in the inputs' precision (the log-probs are float32 already): only the sums need more.
    """
    # -inf log-probs become the most negative finite number: where p_ref = 0 the term is 0 * finite = 0
    # (also when both are -inf); where only p = 0 it stays huge, as KL is then infinite
    lowest = torch.finfo(ref_logprobs.dtype).min
    ref, other = ref_logprobs.clamp(min=lowest), logprobs.clamp(min=lowest)
    return (ref.exp() * (ref - other)).sum(-1, dtype=torch.float64)


def compare_to_reference(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> Scores:
    kl = kl_per_position(ref_logprobs, logprobs)
    agree = int((ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum())
    return Scores(kl_sum=float(kl.sum()), top1_agree=agree, n_compared=kl.numel())


def score_windows(model, windows: Windows, ref_logprobs: torch.Tensor | None = None,
                  batch_size: int = 8, keep_logprobs: bool = False, progress: bool = False,
                  desc: str = "scoring windows") -> tuple[Scores, torch.Tensor | None]:
    """NLL over all windows; KL and top-1 over the first ref_logprobs.shape[0] windows if given.

    With keep_logprobs, also returns the log-probs of every window (to serve as a reference).
    progress: a bar on stderr (off by default: compare and tests call this many times).
    """
    total, kept = Scores(), []
    n_ref = 0 if ref_logprobs is None else ref_logprobs.shape[0]
    bar = tqdm(total=windows.n_windows, desc=desc, unit="window", file=sys.stderr, disable=not progress)
    for start in range(0, windows.n_windows, batch_size):
        ids = windows.ids[start:start + batch_size]
        lp = next_token_logprobs(model, ids)
        bar.update(ids.shape[0])
        total.add(Scores(nll_sum=token_nll_sum(lp, ids), n_scored=lp.shape[0] * lp.shape[1]))
        if start < n_ref:
            n = min(lp.shape[0], n_ref - start)
            total.add(compare_to_reference(ref_logprobs[start:start + n], lp[:n]))
        if keep_logprobs:
            kept.append(lp)
    bar.close()
    return total, (torch.cat(kept) if keep_logprobs else None)
