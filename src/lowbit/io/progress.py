"""Per-tensor progress bars for every exporter and importer, on stderr (stdout keeps only the result).

One convention for all formats, the GGUF exporter's: a bar is drawn only when the caller asks
(`progress=True`; the `lowbit export` / `lowbit import` commands ask unless `--quiet`, the Python API
does not), whether or not stderr is a terminal, so a log file shows the final `n/total` too. The unit is
the tensor, and a finished bar's `n/total` is the number of tensors written or read.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from tqdm.auto import tqdm


def tensor_bar(total: int, what: str, progress: bool) -> tqdm:
    """A bar over `total` tensors labelled `what` ("GPTQ tensors"), silent unless `progress`."""
    return tqdm(total=total, desc=what, unit="tensor", file=sys.stderr, disable=not progress)


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


@contextmanager
def consumed(tensors: dict, what: str, progress: bool) -> Iterator[Callable[[], None]]:
    """A bar over every tensor an importer read into `tensors`; the `tick()` it yields advances the bar by the
    tensors taken (popped) out of `tensors` since the last tick (one quantised module's), and leaving the
    block advances it by the float rest, loaded as they are into the model around the modules. An error
    inside the block closes the bar before the error is printed."""
    with tensor_bar(len(tensors), what, progress) as bar:
        left = [len(tensors)]

        def tick() -> None:
            bar.update(left[0] - len(tensors))
            left[0] = len(tensors)

        yield tick
        bar.update(len(tensors))
