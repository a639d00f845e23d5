"""Calibration documents as token batches: seeded windows of one stream, or one sample per document.

    windows  every document joined into one stream (separated by the EOS token) and N windows of L tokens
             cut from it at seeded offsets: each window full, no padding, no mask. What a causal LM trained
             on packed text sees in training.
    samples  N documents (a seeded draw), each its own sequence as the model sees it at inference: the
             tokenizer's special tokens (BOS, or CLS ... SEP), a conversation through the chat template,
             truncated to L tokens; batched with right padding and an attention mask. What llm-compressor
             and AutoGPTQ feed, and what an encoder such as BERT sees. The pipeline hands statistics only
             the rows of real tokens (pipeline/blocks.py): padding never reaches a Hessian, a channel
             mean or maximum, or a scale search.

"auto" (the default) picks samples for encoders (they never see a stream) and for conversations, windows
otherwise.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.pipeline.calibration import read_texts

MODES = ("auto", "windows", "samples")


def context_length(model) -> int | None:
    """The positions the model was built for (max_position_embeddings, GPT-2's n_positions; RoBERTa's
    learned positions start after the padding index), or None when its config does not say."""
    config = getattr(model, "config", None)
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(n, int):
        return None
    if getattr(config, "model_type", None) in ("roberta", "xlm-roberta") and isinstance(config.pad_token_id, int):
        n -= config.pad_token_id + 1
    return n


def check_context(model, length: int | None) -> None:
    """Calibration sequences of `length` tokens must fit the model's context: a one-line error naming both."""
    n = context_length(model)
    if length is not None and n is not None and length > n:
        raise LowbitError(f"calibration sequences of {length} tokens are longer than the model's context of {n} "
                          f"positions: use --seq-len (seq_len=) {n} or less")


def check_token_ids(model, ids) -> None:
    """Token ids (a tensor, or a list of them) must index the model's embedding: a tokenizer from another
    model gives ids past its last row, which would fail deep inside the forward pass."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    tensors = ids if isinstance(ids, (list, tuple)) else [ids]
    top = max((int(t.max()) for t in tensors if isinstance(t, torch.Tensor) and t.numel()), default=-1)
    if rows is not None and top >= rows:
        raise LowbitError(f"token id {top} is past the model's {rows} embedding rows: the tokenizer does not "
                          f"belong to this model")


@dataclass
class CalibrationSet:
    """Calibration token ids, as the pipeline runs them.

    ids:   windows: int64 [n, L]; samples: a list of n int64 [length_i] sequences (special tokens included)
    mode:  "windows" or "samples"
    pad_id: the id padded positions get in samples mode (never seen by a statistic)
    """

    ids: torch.Tensor | list
    mode: str = "windows"
    pad_id: int = 0
    asked: int | None = None      # samples asked for, where the data held fewer documents

    @classmethod
    def of(cls, calibration) -> "CalibrationSet | None":
        """A set from ids [n, L] (windows), a set, or None."""
        if calibration is None or isinstance(calibration, CalibrationSet):
            return calibration
        return cls(calibration, "windows")

    @property
    def n_samples(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        """Real tokens (padding excluded): what every statistic is computed over."""
        if isinstance(self.ids, torch.Tensor):
            return self.ids.numel()
        return sum(int(s.numel()) for s in self.ids)

    @property
    def length(self) -> int:
        """The longest sequence's length."""
        if isinstance(self.ids, torch.Tensor):
            return int(self.ids.shape[1])
        return max((int(s.numel()) for s in self.ids), default=0)

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """[(ids [b, L_batch], attention mask [b, L_batch] int64 or None when every position is real)].
        Samples are padded on the right, to the longest of their batch: a causal model's real tokens
        never attend to the padding, and their positions stay 0, 1, 2, ..."""
        if isinstance(self.ids, torch.Tensor):
            return [(ids, None) for ids in self.ids.split(batch_size)]
        out = []
        for start in range(0, len(self.ids), batch_size):
            seqs = self.ids[start:start + batch_size]
            width = max(int(s.numel()) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.int64)
            mask = torch.zeros(len(seqs), width, dtype=torch.int64)
            for row, s in enumerate(seqs):
                ids[row, :s.numel()] = s
                mask[row, :s.numel()] = 1
            out.append((ids, None if bool(mask.all()) else mask))
        return out

    def describe(self) -> str:
        what = "windows" if self.mode == "windows" else "samples (one document each, padding masked)"
        short = f" (of {self.asked} asked: the calibration data has no more documents)" if self.asked else ""
        return f"calibration: {self.n_samples} {what}, {self.n_tokens:,} tokens{short}"


# ---------------------------------------------------------------------------------------------------
# Windows

def tokenize_texts(tokenizer, texts: list) -> torch.Tensor:
    """One stream of every document, separated by the EOS token (conversations rendered by the chat
    template first)."""
    texts = [_render(tokenizer, t) if not isinstance(t, str) else t for t in texts]
    sep = tokenizer.eos_token or "\n\n"
    return tokenizer(sep.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """n_samples windows of seq_len tokens at seeded random offsets: [n_samples, seq_len]."""
    if n_samples < 1 or seq_len < 2:
        raise LowbitError(f"need at least 1 sample of at least 2 tokens, got {n_samples} x {seq_len}")
    if ids.numel() < seq_len:
        raise LowbitError(f"calibration text has {ids.numel()} tokens, fewer than one sample of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def calibration_batch(tokenizer, source=None, n_samples: int = 128, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """Windows mode: int64 [n_samples, seq_len]."""
    _need_tokenizer(tokenizer)
    return sample_windows(tokenize_texts(tokenizer, read_texts(source)), n_samples, seq_len, seed)


# ---------------------------------------------------------------------------------------------------
# Samples

def _render(tokenizer, conversation: list) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise LowbitError("calibration rows with 'messages' need a tokenizer with a chat template, and this one has none")
    return tokenizer.apply_chat_template(conversation, tokenize=False)


@contextmanager
def tokenizer_state_kept(tokenizer):
    """Run a block that calls `tokenizer` with truncation or padding, and leave the tokenizer as it was.
    A fast tokenizer sets those on its backend for such a call and keeps them: saved afterwards, its
    tokenizer.json cut every input at the calibration length for any consumer reading that file (the
    `tokenizers` library, a GGUF's embedded tokenizer), and a folder saved after a reload differed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        yield tokenizer
        return
    truncation, padding = backend.truncation, backend.padding
    try:
        yield tokenizer
    finally:
        if truncation is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**truncation)
        if padding is None:
            backend.no_padding()
        else:
            backend.enable_padding(**padding)


def encode_sample(tokenizer, doc, seq_len: int) -> torch.Tensor:
    """One document as the model sees it, at most seq_len tokens: int64 [length]. A string gets the
    tokenizer's special tokens; a conversation is rendered by the chat template, which writes its own."""
    if isinstance(doc, str):
        ids = tokenizer(doc, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
    else:
        ids = tokenizer(_render(tokenizer, doc), add_special_tokens=False, truncation=True,
                        max_length=seq_len)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def calibration_samples(tokenizer, source=None, n_samples: int = 128, seq_len: int = 256, seed: int = 0) -> CalibrationSet:
    """Samples mode: n_samples documents drawn without replacement (seeded; all of them when there are
    fewer), each encoded on its own and truncated to seq_len, ordered longest first so that a batch
    pads little."""
    _need_tokenizer(tokenizer)
    if n_samples < 1 or seq_len < 2:
        raise LowbitError(f"need at least 1 sample of at least 2 tokens, got {n_samples} x {seq_len}")
    docs = [d for d in read_texts(source) if not isinstance(d, str) or d.strip()]
    if not docs:
        raise LowbitError("the calibration data holds no documents")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(docs), generator=gen)[:n_samples].tolist()
    with tokenizer_state_kept(tokenizer):
        seqs = [encode_sample(tokenizer, docs[i], seq_len) for i in chosen]
    seqs = sorted((s for s in seqs if s.numel()), key=lambda s: -s.numel())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return CalibrationSet(seqs, "samples", int(pad), n_samples if len(seqs) < n_samples else None)


def resolve_mode(mode: str, causal: bool, source=None) -> str:
    """"auto" -> "samples" for an encoder (causal=False) or conversations, "windows" otherwise."""
    if mode not in MODES:
        raise LowbitError(f"calibration mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "samples" if not causal or _has_conversations(source) else "windows"


def _has_conversations(source) -> bool:
    if isinstance(source, (list, tuple)):
        return any(not isinstance(d, str) for d in source)
    if source is not None and str(source).endswith(".jsonl") and Path(source).is_file():
        return any(not isinstance(d, str) for d in read_texts(source))
    return False


def build_calibration(tokenizer, source=None, n_samples: int = 128, seq_len: int = 256, seed: int = 0,
                      mode: str = "windows") -> CalibrationSet:
    """The calibration set of a resolved mode ("windows" or "samples")."""
    if mode == "samples":
        return calibration_samples(tokenizer, source, n_samples, seq_len, seed)
    return CalibrationSet(calibration_batch(tokenizer, source, n_samples, seq_len, seed), "windows")


def _need_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise LowbitError("calibration text needs a tokenizer, and this model folder has none")
