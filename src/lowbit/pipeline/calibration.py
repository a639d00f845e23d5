"""Calibration data: the bundled text, local .txt/.jsonl/.parquet files or a saved `datasets` dataset,
cut into N seeded windows of L tokens."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.errors import LowbitError


def needs_calibration(config) -> bool:
    """Whether a method (or every config of a Recipe) reads calibration activations: its declared stats,
    a sequential pass, or an input-scale search."""
    from lowbit.methods.recipe import Recipe
    from lowbit.methods.scaling import InputScaling

    if isinstance(config, Recipe):
        return any(needs_calibration(c) for c in config.configs())
    return bool(config.required_stats) or config.sequential or isinstance(config, InputScaling)


def read_texts(source=None) -> list[str]:
    """Documents from a source: None (bundled calibration text), a list of strings, or a path."""
    if source is None:
        from lowbit.data import bundled_documents

        return bundled_documents("calibration")
    if isinstance(source, str) and not Path(source).exists() and ("\n" in source or " " in source):
        return [source]  # a literal text, not a path
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise LowbitError("calibration texts must be strings")
        return list(source)
    path = Path(source)
    if not path.exists():
        raise LowbitError(f"calibration data not found: {path}")
    if path.is_dir():
        return _read_saved_dataset(path)
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise LowbitError(f"unsupported calibration file {path.name}: use .txt, .jsonl, .parquet or a saved dataset folder")


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LowbitError(f"{path}:{i} is not valid JSON")
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise LowbitError(f"{path}:{i} has no string field 'text'")
        texts.append(row["text"])
    return texts


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LowbitError("reading .parquet calibration files needs pyarrow (pip install pyarrow)")
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise LowbitError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def _read_saved_dataset(path: Path) -> list[str]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise LowbitError("reading a saved dataset folder needs the `datasets` package")
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take its first split
        ds = ds[sorted(ds.keys())[0]]
    if "text" not in ds.column_names:
        raise LowbitError(f"{path} has no 'text' column")
    return list(ds["text"])


def tokenize_texts(tokenizer, texts: list[str]) -> torch.Tensor:
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids


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
    if tokenizer is None:
        raise LowbitError("calibration text needs a tokenizer, and this model folder has none")
    return sample_windows(tokenize_texts(tokenizer, read_texts(source)), n_samples, seq_len, seed)
