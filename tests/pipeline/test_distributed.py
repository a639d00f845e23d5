"""Calibration and quantisation shared among processes (pipeline/distributed.py): two gloo processes on the
CPU write, byte for byte, the folder one process writes (RTN, GPTQ, AWQ; batches that do not divide among
the ranks, fewer batches than ranks, padded samples, no calibration at all), through the API and through
`torchrun -m lowbit quantize`; a rank that dies stops the other with one line instead of a hang."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.methods.stats import LayerStats, StatsUpdate
from lowbit.pipeline.distributed import Split
from tests.conftest import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, 512, (10, 32), generator=torch.Generator().manual_seed(0))
WORLD = 2
# (name, method, calibration rows, batch size, family): 5 batches over 2 ranks (uneven), 1 batch (a rank
# without any), AWQ's scale search over the first 4 of 5 batches, RTN with no calibration (only the solves
# shared), padded samples, and a family whose q/k/v carry biases
CASES = [("rtn", "rtn-int4-g32", 10, 2, "llama"), ("rtn-uncalibrated", "rtn-int4-g32", 0, 2, "llama"),
         ("gptq", "gptq-int4-g32", 10, 2, "llama"), ("gptq-one-batch", "gptq-int4-g32", 1, 8, "llama"),
         ("awq", "awq-int4-g32", 10, 2, "llama"), ("gptq-samples", "gptq-int4-g32", None, 3, "llama"),
         ("gptq-qwen2", "gptq-int4-g32", 10, 2, "qwen2")]


# ---------------------------------------------------------------------------------------------------
# Without processes: the split's bookkeeping and the statistics updates


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7])
def test_rounds_visit_every_item_once_in_order_on_its_owner(world, n):
    items = list(range(n))
    seen = []
    for rank in range(world):
        split = Split(n, rank, world)
        assert split.local == len(split.mine(items))
    for r, sources in Split(n, 0, world).rounds(n):
        for src in sources:
            item = Split(n, src, world).mine(items)[r]   # rank src's r-th item
            assert item % world == src
            seen.append(item)
    assert seen == items
    assert Split(n, 0, world).head(3).batches == min(3, n) and Split(n, 0, world).head(None).batches == n


def test_updates_added_in_order_equal_the_running_statistics():
    torch.manual_seed(0)
    xs = [torch.randn(7, 16), torch.randn(3, 16), torch.randn(11, 16)]
    running, added = LayerStats(16, keep_inputs=True), LayerStats(16, keep_inputs=True)
    for x in xs:
        running.update(x)
    updates = [StatsUpdate.of(x, keep_rows=True) for x in xs]    # made apart, as on other ranks
    for u in updates:
        added.add(StatsUpdate.from_tensors(iter(u.tensors())))
    assert torch.equal(running.xtx, added.xtx) and torch.equal(running.abs_sum, added.abs_sum)
    assert torch.equal(running.abs_max, added.abs_max) and running.n_tokens == added.n_tokens == 21
    assert torch.equal(running.input_matrix(), torch.cat(xs))


def test_distributed_without_a_process_group_is_one_line():
    model = build_tiny_model("llama")
    with pytest.raises(LowbitError, match="needs a torch.distributed process group"):
        api.quantize(model, "rtn-int4-g32", calibration=IDS, progress=False, distributed=True)


@pytest.mark.parametrize("flag", [["--stream"], ["--budget", "4bpw"]])
def test_torchrun_refuses_what_it_does_not_share(tmp_path, monkeypatch, capsys, flag):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["quantize", "--method", "rtn-int4-g32", *flag, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: ") and "torchrun" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Two processes


def _worker(rank: int, store: str, src: Path, out: Path, samples) -> None:
    """One rank: every case in one process group, rank 0 saving each; then rank 1 dies while rank 0 starts
    one more run, whose error rank 0 writes down."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    for name, method, n, batch_size, family in CASES:
        model, _ = api.load_model(src / family)
        api.quantize(model, method, calibration=_calibration(n, samples), batch_size=batch_size, progress=False,
                     distributed=True)
        if rank == 0:
            api.save(model, out / name)
    if rank == 1:
        os._exit(3)
    model, _ = api.load_model(src / "llama")
    start = time.monotonic()
    try:
        api.quantize(model, "gptq-int4-g32", calibration=IDS, batch_size=2, progress=False, distributed=True)
    except LowbitError as e:
        (out / "died.error").write_text(f"{time.monotonic() - start:.1f}\n{e}")
    dist.destroy_process_group()


def _calibration(n, samples):
    return samples if n is None else (IDS[:n] if n else None)


def _run_ranks(tmp: Path, src: Path, samples, timeout: float = 600) -> list[int]:
    """Start WORLD spawned processes running _worker; their exit codes."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp / "store"), src, tmp, samples)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def same_folders(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory, tiny_tokenizer):
    """(source folder, folder of the two-process outputs, the padded calibration set)."""
    tmp = tmp_path_factory.mktemp("distributed")
    for family in dict.fromkeys(case[-1] for case in CASES):
        build_tiny_model(family).save_pretrained(tmp / "src" / family)
    texts = [" ".join(["the quick brown fox jumps over the lazy dog"] * k) for k in (1, 5, 2, 7, 3, 1, 4)]
    samples = api.calibration_for(build_tiny_model("llama"), "gptq-int4-g32", texts, tiny_tokenizer, n_samples=7,
                                  seq_len=64, calibration_mode="samples")
    assert samples.mode == "samples" and any(mask is not None for _, mask in samples.batches(3))   # padded
    assert _run_ranks(tmp, tmp / "src", samples) == [0, 3]   # rank 1 left at the end, on purpose
    return tmp / "src", tmp, samples


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_processes_write_the_bytes_of_one(shared_runs, tmp_path, one_thread, case):
    src, shared, samples = shared_runs
    name, method, n, batch_size, family = case
    model, _ = api.load_model(src / family)
    api.quantize(model, method, calibration=_calibration(n, samples), batch_size=batch_size, progress=False)
    same_folders(api.save(model, tmp_path / name), shared / name)


def test_a_rank_that_dies_stops_the_other_in_one_line(shared_runs):
    seconds, message = (shared_runs[1] / "died.error").read_text().split("\n", 1)
    assert message.startswith("rank 0: lost contact with the other processes") and "\n" not in message
    assert float(seconds) < 60   # at once, not after the timeout


def test_torchrun_cli_writes_the_bytes_of_one_process(tiny_model_dir, tmp_path, one_thread, monkeypatch):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    src = tiny_model_dir("llama")
    args = ["quantize", str(src), "--method", "gptq", "--group-size", "32", "--samples", "5", "--seq-len", "32",
            "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(WORLD), "-m", "lowbit", *args,
                          "--threads", "1", "-o", str(tmp_path / "shared")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("saved gptq-int4-g32 model") == 1   # rank 0 alone reports and writes
    # the one-process run in a fresh interpreter too: earlier tests in this process may have changed
    # library-wide state (transformers' tokenizer defaults) that a saved tokenizer_config.json reflects
    one = subprocess.run([sys.executable, "-m", "lowbit", *args, "--threads", "1", "-o", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    same_folders(tmp_path / "one", tmp_path / "shared")
    shutil.rmtree(tmp_path / "shared")
