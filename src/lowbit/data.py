"""The bundled model and texts (data/ in the repository, rebuilt by scripts/)."""
from __future__ import annotations

import os
from pathlib import Path

from lowbit.errors import LowbitError

BUNDLED_MODEL = "lowbit-tiny-llama"
TEXT_SPLITS = ("train", "calibration", "eval")
DOCUMENT_SEPARATOR = "\n<|endoftext|>\n"


def data_dir() -> Path:
    """LOWBIT_DATA if set, else the repository's data/ folder (the package is installed from the repo)."""
    env = os.environ.get("LOWBIT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def bundled_model_path() -> Path:
    path = data_dir() / BUNDLED_MODEL
    if not (path / "config.json").is_file():
        raise LowbitError(f"the bundled model is missing at {path}; rebuild it with scripts/train_bundled_model.py")
    return path


def bundled_text(split: str) -> str:
    if split not in TEXT_SPLITS:
        raise LowbitError(f"unknown text split {split!r}; expected one of {', '.join(TEXT_SPLITS)}")
    path = data_dir() / "corpus" / f"{split}.txt"
    if not path.is_file():
        raise LowbitError(f"the bundled text is missing at {path}; rebuild it with scripts/build_corpus.py")
    return path.read_text(encoding="utf-8")


def bundled_documents(split: str) -> list[str]:
    return [d for d in bundled_text(split).split(DOCUMENT_SEPARATOR) if d.strip()]


def bundled_sentences(split: str, min_words: int = 6, max_words: int = 60) -> list[str]:
    """The sentences of a split's documents, in order, each once: prose broken at sentence ends and
    blank lines, whitespace collapsed, kept when it has min_words..max_words words and starts with a
    letter (code and tables mostly fail that). The calibration and eval splits share no document, so
    their sentences are held out from each other."""
    import re

    seen, out = set(), []
    for doc in bundled_documents(split):
        for para in re.split(r"\n\s*\n", doc):
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split())):
                words = sent.split()
                if min_words <= len(words) <= max_words and sent[0].isalpha() and sent not in seen:
                    seen.add(sent)
                    out.append(sent)
    return out
