"""Per-tensor progress bars for every exporter and importer, on stderr (stdout keeps only the result).

One convention for all formats, the GGUF exporter's: a bar is drawn only when the caller asks
(`progress=True`; the `lowbit export` / `lowbit import` commands ask unless `--quiet`, the Python API
does not), whether or not stderr is a terminal, so a log file shows the final `n/total` too. The unit is
the tensor, and a finished bar's `n/total` is the number of tensors written or read.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator

from tqdm.auto import tqdm


def tensor_bar(total: int, what: str, progress: bool) -> tqdm:
    """A bar over `total` tensors labelled `what` ("GPTQ tensors"), silent unless `progress`."""
    return tqdm(total=total, desc=what, unit="tensor", file=sys.stderr, disable=not progress)


def tensors_of_each(items: Iterable, count: Callable[[object], int], total: int, what: str,
                    progress: bool, rest: int = 0) -> Iterator:
    """Yield each of `items` while a bar over `total` tensors advances by count(item) once the caller is
    done with it (a block of a GGUF file and its tensors, say), and by `rest`, the tensors read outside
    the items (embedding, norm, head), at the end."""
    with tensor_bar(total, what, progress) as bar:
        for item in items:
            yield item
            bar.update(count(item))
        bar.update(rest)


def packed_tensors(tensors: dict, weights: dict, pack: Callable[[str, object], dict], what: str,
                   progress: bool) -> dict:
    """`tensors` (the float ones, already made) with pack(name, weight) added for every quantised weight:
    the long part of an export (codes packed layer by layer), shown as a bar over the tensors written.
    The total assumes every layer packs into as many tensors as the first, and is corrected if one does not
    (a bias, a static input scale), so the finished bar counts exactly the tensors in the file."""
    out, items = dict(tensors), iter(weights.items())
    first = next(items, None)
    head = pack(*first) if first else {}
    with tensor_bar(len(out) + len(head) * len(weights), what, progress) as bar:
        bar.update(len(out) + len(head))
        out.update(head)
        for name, weight in items:
            part = pack(name, weight)
            if len(part) != len(head):
                bar.total += len(part) - len(head)
            out.update(part)
            bar.update(len(part))
    return out


def consumed(tensors: dict, names: Iterable[str], what: str, progress: bool) -> Iterator[str]:
    """Yield each quantised module's name to an importer that takes (pops) its tensors out of `tensors`;
    a bar over every tensor read advances by those taken, and by the float rest at the end (loaded as they
    are, into the model around the modules)."""
    with tensor_bar(len(tensors), what, progress) as bar:
        for name in names:
            before = len(tensors)
            yield name
            bar.update(before - len(tensors))
        bar.update(len(tensors))
