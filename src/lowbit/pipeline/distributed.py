"""Calibration and quantisation split across processes (torch.distributed), with the single-process bytes.

`torchrun --nproc-per-node N -m lowbit quantize ...` (or `lowbit.quantize(..., distributed=True)` in a
process group the caller set up) shares the work of the block walk (pipeline/runner.py):

- calibration batch k is run by rank k % N: its capture, block passes and activations stay there;
- statistics are never all-reduced, because a floating-point sum depends on its order: each batch's
  contribution (x^T x, |x| sums and maxima, token counts, kept rows; AWQ's per-batch block error) is made
  on its owner, broadcast, and added on every rank in batch order, as one process adds them;
- the Linears of one group that share an input (q/k/v, gate/up) are solved round-robin, Linear i by rank
  i % N, and each result is broadcast (layer_config JSON plus tensors, as the native format stores it;
  nothing is pickled), so every rank swaps in the same modules and the next block sees the same weights.

Both are `Split.rounds`: in round r every rank works on its own item at once, then the items are shared
in order. One process is the same loop with nothing to share, so the two paths run the same arithmetic
on the same values, and the saved folder is byte-identical **at equal CPU threads per process**: a GEMM's
result can depend on its thread count (torchrun sets OMP_NUM_THREADS=1; compare with `--threads 1`).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch

from lowbit.errors import LowbitError

TIMEOUT_ENV = "LOWBIT_DIST_TIMEOUT"   # minutes a rank waits for the others before giving up
DEFAULT_TIMEOUT_MINUTES = 30          # the longest single-Linear solve of a large model on CPU fits in it
# dtype <-> code in a message header; every dtype a statistic or a quantised module's state holds
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Split:
    """How a run's work is shared: `batches` calibration batches in the whole run (every rank's; their
    order fixes the order of every sum), this process's `rank` among `world`, the process `group` (None:
    the default one) and the `device` messages travel through (cpu for gloo, the rank's GPU for NCCL)."""

    batches: int
    rank: int = 0
    world: int = 1
    group: object = None
    device: str = "cpu"

    def mine(self, items: list) -> list:
        """This rank's share of the run's items (item k is rank k % world's)."""
        return items[self.rank::self.world]

    def head(self, n: int | None) -> "Split":
        """The split of the run's first n batches (None: all)."""
        return self if n is None else replace(self, batches=min(n, self.batches))

    @property
    def local(self) -> int:
        """How many of the batches are this rank's."""
        return len(range(self.rank, self.batches, self.world))

    def rounds(self, n: int):
        """(round r, [the ranks whose item r·world + s exists]) over n items: item r is each rank's r-th."""
        for r in range(math.ceil(n / self.world)):
            yield r, [s for s in range(self.world) if r * self.world + s < n]

    def in_order(self, values: list[float]) -> list[float]:
        """Every rank's per-batch values (this rank's `values`, one per own batch) in the run's batch order."""
        if self.world == 1:
            return list(values)
        own = torch.tensor(values, dtype=torch.float64)
        per_rank = [self.share([own] if s == self.rank else None, s)[0].tolist() for s in range(self.world)]
        return [per_rank[k % self.world][k // self.world] for k in range(self.batches)]

    def share(self, tensors: list[torch.Tensor] | None, src: int) -> list[torch.Tensor]:
        """`tensors` of rank `src` on every rank (others pass None); one process: `tensors` as they are."""
        if self.world == 1:
            return tensors
        try:
            return _broadcast(tensors if self.rank == src else None, src, self.group, self.device)
        except RuntimeError as e:   # a peer died, or the timeout passed while it worked
            raise LowbitError(f"rank {self.rank}: lost contact with the other processes ({_reason(e)}): another "
                              f"one failed, or took longer than {timeout_minutes():g} minutes ({TIMEOUT_ENV})") from None

    def share_json(self, obj, src: int):
        """A JSON value of rank `src` on every rank (floats exactly: json writes their shortest repr)."""
        if self.world == 1:
            return obj
        sent = [torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)] if self.rank == src else None
        (t,) = self.share(sent, src)
        return json.loads(bytes(t.numpy()).decode())

    def share_module(self, module, src: int):
        """A quantised module of rank `src` rebuilt on every rank from its layer_config and state, as the
        native format saves and loads it."""
        if self.world == 1:
            return module
        from lowbit.nn import MODULES

        state = module.state_dict() if self.rank == src else {}
        layout = self.share_json({"config": module.layer_config(), "names": list(state)} if self.rank == src
                                 else None, src)
        tensors = self.share(list(state.values()) if self.rank == src else None, src)
        if self.rank == src:
            return module
        rebuilt = MODULES[layout["config"]["module"]].from_layer_config(layout["config"])
        # assign: the owner's tensors as they are (dtype included), not copied into the empty module's
        rebuilt.load_state_dict(dict(zip(layout["names"], tensors)), strict=True, assign=True)
        return rebuilt

    def share_report(self, report, src: int):
        from lowbit.pipeline.report import LayerReport

        if self.world == 1:
            return report
        return LayerReport(**self.share_json(asdict(report) if self.rank == src else None, src))


def _reason(e: Exception) -> str:
    """The backend's first sentence, without its source location ("[.../pair.cc:553] Connection closed ...")."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0]


def _header(tensors: list[torch.Tensor]) -> list[int]:
    out = [len(tensors)]
    for t in tensors:
        out += [DTYPES.index(t.dtype), t.dim(), *t.shape]
    return out


def _parse_header(header: list[int]) -> list[tuple[torch.dtype, list[int]]]:
    specs, i = [], 1
    for _ in range(header[0]):
        dtype, ndim = DTYPES[header[i]], header[i + 1]
        specs.append((dtype, header[i + 2:i + 2 + ndim]))
        i += 2 + ndim
    return specs


def _broadcast(tensors, src: int, group, device: str) -> list[torch.Tensor]:
    """One message: its length, a header of dtypes and shapes (int64), then every tensor's bytes in one
    buffer. Three collectives whatever the number of tensors."""
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64, device=device)
    if tensors is not None:
        header = torch.tensor(_header(tensors), dtype=torch.int64, device=device)
        size[0] = header.numel()
    dist.broadcast(size, src, group=group)
    if tensors is None:
        header = torch.empty(int(size[0]), dtype=torch.int64, device=device)
    dist.broadcast(header, src, group=group)
    specs = _parse_header(header.tolist())
    nbytes = [math.prod(shape) * dtype.itemsize for dtype, shape in specs]
    if tensors is not None:
        parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        payload = torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    else:
        payload = torch.empty(sum(nbytes), dtype=torch.uint8, device=device)
    if payload.numel():
        dist.broadcast(payload, src, group=group)
    if tensors is not None:
        return list(tensors)
    payload, out, start = payload.cpu(), [], 0
    for (dtype, shape), n in zip(specs, nbytes):
        # clone: a view of another dtype needs its own, aligned storage
        out.append(payload[start:start + n].clone().view(dtype).reshape(shape))
        start += n
    return out


def timeout_minutes() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        raise LowbitError(f"{TIMEOUT_ENV} must be a number of minutes, got {value!r}") from None
    if minutes <= 0:
        raise LowbitError(f"{TIMEOUT_ENV} must be positive, got {value!r}")
    return minutes


def launched() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1 in its environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@contextmanager
def process_group(backend: str | None = None):
    """The default process group from torchrun's environment (MASTER_ADDR, RANK, WORLD_SIZE ...), gloo
    unless `backend` says otherwise ("nccl" for GPUs), destroyed on the way out; a no-op when one exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    backend = backend or "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes()))
    try:
        yield
    finally:
        dist.destroy_process_group()


def current_split(batches: int, distributed: bool) -> Split:
    """The split of a run of `batches` batches: over the default process group when `distributed`
    (which must be initialised), else this process alone."""
    if not distributed:
        return Split(batches)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise LowbitError("distributed=True needs a torch.distributed process group: start the script with "
                          "torchrun, and call torch.distributed.init_process_group (or use "
                          "lowbit.pipeline.distributed.process_group())")
    nccl = dist.get_backend() == "nccl"
    device = f"cuda:{torch.cuda.current_device()}" if nccl else "cpu"
    return Split(batches, dist.get_rank(), dist.get_world_size(), None, device)


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_processes() -> int:
    """Processes torchrun started on this machine (LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if launched() else 1
    except ValueError:
        return 1
