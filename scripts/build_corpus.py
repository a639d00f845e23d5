"""Build the small English corpus bundled with lowbit.

The text comes only from what every CPython install carries, so the corpus
can be rebuilt anywhere without network access:

* ``pydoc_data.topics.topics``: the language-reference help topics, one
  document per topic;
* standard-library docstrings: every ``.py`` file under the stdlib directory
  (tests, IDLE, lib2to3, demos, vendored packages and site-packages skipped)
  is parsed with ``ast`` -- never imported -- and its module, class and
  function docstrings are joined by blank lines into one document per module.

Documents are shuffled with a fixed seed and dealt out by character count
into eval and calibration, each getting 5% of all characters but at least
150,000 (so perplexity and calibration statistics are not dominated by a
handful of documents), and train, which gets the rest.  With CPython 3.11 the
two sources hold only ~2 MB in total, so the floor applies and the split is
roughly 85% / 7.5% / 7.5%.

Output format (``data/corpus/{train,calibration,eval}.txt``, UTF-8): the
documents of a split separated by a line holding exactly ``<|endoftext|>``,
i.e. ``doc1 + "\\n<|endoftext|>\\n" + doc2 + ...``.  No document contains that
string (it is removed if present), so ``text.split(DOC_SEPARATOR)`` recovers
the documents exactly.  The same string is the tokenizer's end-of-text token.

The exact text depends on the Python version (docstrings change between
releases); ``data/corpus/README.md`` records the version used.

Usage: python scripts/build_corpus.py [--out data/corpus] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

END_OF_TEXT = "<|endoftext|>"
DOC_SEPARATOR = f"\n{END_OF_TEXT}\n"

SPLIT_FRACTIONS = {"eval": 0.05, "calibration": 0.05}  # the rest is train
MIN_SPLIT_CHARS = 150_000
MIN_DOCSTRING_CHARS = 20
MIN_DOCUMENT_CHARS = 200

# Directory names anywhere under the stdlib that hold tests, tools, demos,
# vendored third-party code or generated files rather than documented API.
SKIPPED_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "pydoc_data",  # the topics are added separately, as text
    "lib-dynload",
}
SKIPPED_DIR_PREFIXES = ("config-",)  # e.g. config-3.11-x86_64-linux-gnu
SKIPPED_FILE_PREFIXES = ("_sysconfigdata", "test_")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def clean_text(text: str) -> str:
    """Normalise line endings and trailing spaces, and drop the separator."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace(END_OF_TEXT, "")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip()


def topic_documents() -> list[Document]:
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        text = clean_text(topics[name])
        if len(text) >= MIN_DOCUMENT_CHARS:
            docs.append(Document(f"topic:{name}", text))
    return docs


def is_skipped(relative: Path) -> bool:
    for part in relative.parts[:-1]:
        if part in SKIPPED_DIRS or part.startswith(SKIPPED_DIR_PREFIXES):
            return True
    return relative.name.startswith(SKIPPED_FILE_PREFIXES)


def stdlib_source_files(stdlib: Path) -> list[Path]:
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        if not is_skipped(path.relative_to(stdlib)):
            files.append(path)
    return files


def module_docstrings(source: bytes) -> list[str]:
    """Module, class and function docstrings in source order."""
    # ast.parse on bytes honours PEP 263 encoding cookies.
    tree = ast.parse(source)
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [node for node in ast.walk(tree) if isinstance(node, documented)]
    # ast.walk is breadth-first; sorting by line keeps the module's reading order.
    nodes.sort(key=lambda node: getattr(node, "lineno", 0))
    docstrings = []
    seen = set()
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc is None:
            continue
        doc = clean_text(doc)
        if len(doc) >= MIN_DOCSTRING_CHARS and doc not in seen:
            seen.add(doc)
            docstrings.append(doc)
    return docstrings


def stdlib_documents(stdlib: Path) -> tuple[list[Document], list[str]]:
    docs, unparsable = [], []
    for path in stdlib_source_files(stdlib):
        relative = path.relative_to(stdlib).as_posix()
        try:
            docstrings = module_docstrings(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError):
            unparsable.append(relative)
            continue
        text = "\n\n".join(docstrings)
        if len(text) >= MIN_DOCUMENT_CHARS:
            docs.append(Document(f"module:{relative}", text))
    return docs, unparsable


def split_documents(docs: list[Document], seed: int) -> dict[str, list[Document]]:
    """Shuffle with a fixed seed, then deal documents out by character budget."""
    order = sorted(docs, key=lambda doc: doc.name)
    random.Random(seed).shuffle(order)
    total_chars = sum(len(doc.text) for doc in order)
    splits: dict[str, list[Document]] = {"train": [], "calibration": [], "eval": []}
    budgets = {
        name: max(fraction * total_chars, MIN_SPLIT_CHARS)
        for name, fraction in SPLIT_FRACTIONS.items()
    }
    filled = dict.fromkeys(budgets, 0)
    for doc in order:
        target = next((name for name in budgets if filled[name] < budgets[name]), "train")
        splits[target].append(doc)
        if target in filled:
            filled[target] += len(doc.text)
    return splits


def write_split(path: Path, docs: list[Document]) -> None:
    path.write_text(DOC_SEPARATOR.join(doc.text for doc in docs) + "\n", encoding="utf-8")


def write_readme(out: Path, splits: dict[str, list[Document]], seed: int, stdlib: Path,
                 unparsable: list[str]) -> None:
    rows = []
    for name, docs in splits.items():
        size = (out / f"{name}.txt").stat().st_size
        n_topics = sum(doc.name.startswith("topic:") for doc in docs)
        rows.append(
            f"| {name}.txt | {len(docs)} | {n_topics} | {len(docs) - n_topics} "
            f"| {sum(len(d.text) for d in docs):,} | {size:,} |"
        )
    version = sys.version.split()[0]
    readme = f"""# lowbit bundled corpus

Generated by `scripts/build_corpus.py --seed {seed}` with CPython {version}
({sys.implementation.name}, {sysconfig.get_platform()}). Do not edit by hand.

## Source

All text ships with CPython itself (PSF license), so it is rebuildable offline:

* `pydoc_data.topics.topics`: the language-reference help topics, one document per topic.
* Docstrings of the pure-Python standard library under `{stdlib.name}/`: each
  `.py` file is parsed with `ast` (not imported); module, class and function
  docstrings of at least {MIN_DOCSTRING_CHARS} characters are joined by blank
  lines into one document per module. Tests, `idlelib`, `lib2to3`,
  `turtledemo`, `ensurepip`, `site-packages` and generated files are skipped.
  Documents shorter than {MIN_DOCUMENT_CHARS} characters are dropped.

Other Python versions produce slightly different text.

## Format

UTF-8. Documents are separated by a line containing exactly `{END_OF_TEXT}`
(`text.split("\\n{END_OF_TEXT}\\n")` gives the documents back). Documents were
shuffled with `random.Random({seed})` and assigned to eval and calibration
until each held max(5% of all characters, {MIN_SPLIT_CHARS:,} characters); the
rest is train.

## Sizes

| file | documents | topic docs | module docs | characters | bytes |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Files that failed to parse and were skipped: {len(unparsable)}.
"""
    (out / "README.md").write_text(readme, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    module_docs, unparsable = stdlib_documents(stdlib)
    docs = topic_documents() + module_docs
    splits = split_documents(docs, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, split_docs in splits.items():
        write_split(args.out / f"{name}.txt", split_docs)
    write_readme(args.out, splits, args.seed, stdlib, unparsable)

    for name, split_docs in splits.items():
        chars = sum(len(doc.text) for doc in split_docs)
        print(f"{name:12s} {len(split_docs):5d} docs {chars:10,d} chars")
    if unparsable:
        print(f"skipped {len(unparsable)} unparsable files: {', '.join(unparsable)}")


if __name__ == "__main__":
    main()
