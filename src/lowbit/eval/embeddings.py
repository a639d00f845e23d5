"""Sentence-embedding fidelity: how far a quantised encoder's embeddings move from full precision's.

Embeddings as sentence-transformers' mean-pooling models make them (all-MiniLM-L6-v2's modules.json:
Transformer -> mean over real tokens -> L2 normalise), computed with transformers alone so that any
encoder folder (or a quantised copy of one) can be scored. Fidelity of a quantised model against the
full-precision one on the same sentences:

    mean / worst cosine   of each sentence's two embeddings (1 = unchanged)
    nn agreement          fraction of sentences whose nearest other sentence (by cosine) is the same
                          under both models: what a retrieval index built on the embeddings would return
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings, float32 [n, hidden]: each sentence with the tokenizer's
    special tokens (CLS ... SEP), padded positions excluded from the mean."""
    from lowbit.pipeline.samples import tokenizer_state_kept

    out = []
    for start in range(0, len(sentences), batch_size):
        with tokenizer_state_kept(tokenizer):   # the caller may save the tokenizer afterwards
            enc = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(out)


@dataclass(frozen=True)
class EmbeddingFidelity:
    mean_cosine: float
    worst_cosine: float
    nn_agreement: float
    worst_index: int          # the sentence with the worst cosine

    def as_dict(self) -> dict:
        return {"mean_cosine": self.mean_cosine, "worst_cosine": self.worst_cosine,
                "nn_agreement": self.nn_agreement, "worst_index": self.worst_index}


def nearest_neighbours(e: torch.Tensor) -> torch.Tensor:
    """int64 [n]: for each row of unit vectors e [n, d], the index of the most similar other row."""
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def embedding_fidelity(reference: torch.Tensor, approx: torch.Tensor) -> EmbeddingFidelity:
    """Cosines and nearest-neighbour agreement of approx [n, d] against reference [n, d] (unit rows)."""
    cos = (torch.nn.functional.normalize(reference.double(), dim=-1)
           * torch.nn.functional.normalize(approx.double(), dim=-1)).sum(-1)
    agree = (nearest_neighbours(reference.double()) == nearest_neighbours(approx.double())).double().mean()
    return EmbeddingFidelity(float(cos.mean()), float(cos.min()), float(agree), int(cos.argmin()))
