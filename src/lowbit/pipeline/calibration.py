"""Calibration data: the bundled text, local .txt/.jsonl/.parquet files or a saved `datasets` dataset.

Two ways to feed it (`CalibrationSet`, pipeline/samples.py): "windows", N seeded windows of L tokens cut
from one stream of every document (what a causal LM trained on packed text sees), and "samples", each
document its own sequence with the tokenizer's special tokens, chat rows through its chat template,
batched with padding and an attention mask (what llm-compressor and AutoGPTQ feed; what an encoder sees).
A document is a string, or a conversation: a list of {"role", "content"} messages (a jsonl row's
`messages` field)."""
from __future__ import annotations

import json
from pathlib import Path


from lowbit.errors import LowbitError


def needs_calibration(config) -> bool:
    """Whether a method (or every config of a Recipe) reads calibration activations: its declared stats,
    a sequential pass, or an input-scale search."""
    from lowbit.methods.recipe import Recipe
    from lowbit.methods.scaling import InputScaling

    if isinstance(config, Recipe):
        return any(needs_calibration(c) for c in config.configs())
    return bool(config.required_stats) or config.sequential or isinstance(config, InputScaling)


def read_texts(source=None) -> list:
    """Documents from a source: None (bundled calibration text), a list of strings (or conversations),
    or a path."""
    if source is None:
        from lowbit.data import bundled_documents

        return bundled_documents("calibration")
    if isinstance(source, str) and not Path(source).exists() and ("\n" in source or " " in source) \
            and not _looks_like_path(source):
        return [source]  # a literal text, not a path
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) or _is_conversation(t) for t in source):
            raise LowbitError("calibration texts must be strings or conversations (lists of role/content dicts)")
        return list(source)
    path = Path(source)
    if not path.exists():
        raise LowbitError(f"calibration data not found: {path}")
    if path.is_dir():
        return _read_saved_dataset(path)
    if path.suffix == ".txt":
        return [read_utf8(path)]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise LowbitError(f"unsupported calibration file {path.name}: use .txt, .jsonl, .parquet or a saved dataset folder")


def _looks_like_path(text: str) -> bool:
    """One line ending in a data file's suffix, or naming folders: meant as a path, not as text."""
    return "\n" not in text and (text.rstrip().endswith((".txt", ".jsonl", ".parquet", ".json"))
                                 or text.startswith(("/", "./", "../", "~")))


def read_utf8(path) -> str:
    """A text file's contents; not UTF-8 is a one-line error naming the file and the byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                          "convert it, e.g. iconv -t UTF-8") from None


def _is_conversation(doc) -> bool:
    return (isinstance(doc, list) and bool(doc)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in doc))


def _read_jsonl(path: Path) -> list:
    """A `text` string or a `messages` conversation per row (chat rows go through the chat template)."""
    docs = []
    for i, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LowbitError(f"{path}:{i} is not valid JSON")
        if isinstance(row, dict) and _is_conversation(row.get("messages")):
            docs.append(row["messages"])
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            docs.append(row["text"])
        else:
            raise LowbitError(f"{path}:{i} has no string field 'text' and no 'messages' list of role/content dicts")
    return docs


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
