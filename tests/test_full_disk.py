"""A real full disk, not a simulated one: each command writes its output into a small tmpfs mounted in a
private mount namespace (`unshare -rm`, no root needed where user namespaces are allowed), runs out of
space part-way, and must say so in one line, exit non-zero and leave nothing in the tmpfs.

tests/test_writing.py raises ENOSPC by hand; this is the same promise with the kernel saying no. Skipped
where the machine forbids user namespaces or tmpfs mounts.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.data import bundled_text
from tests.conftest import fp16_llama_folder

ROOT = Path(__file__).resolve().parents[1]
MOUNT = "/tmp/lowbit-full-disk"   # made inside the namespace, on the namespace's own tmpfs
LISTING = "---listing---"


def _namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mkdir -p {MOUNT} && mount -t tmpfs -o size=64k tmpfs "
                                                           f"{MOUNT}"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="no user mount namespaces (unshare -rm) here")


def on_full_disk(args: list[str], size: str, cwd: Path) -> tuple[int, str, list[str]]:
    """(exit code, stderr, what is left in the tmpfs) of `lowbit ARGS` whose output names {out} inside a
    tmpfs of `size` (e.g. "200k")."""
    args = [a.replace("{out}", MOUNT + "/out") for a in args]
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "lowbit", *args])
    script = (f"mkdir -p {MOUNT} && mount -t tmpfs -o size={size} tmpfs {MOUNT} || exit 99; "
              f"{command}; rc=$?; echo {LISTING} >&2; ls -A {MOUNT} >&2; exit $rc")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=600)
    assert p.returncode != 99, p.stderr
    err, _, left = p.stderr.partition(LISTING + "\n")
    return p.returncode, err, left.split()


def assert_one_line_full_disk(rc: int, err: str, left: list[str]) -> None:
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]
    assert rc not in (0, None), err
    assert "Traceback" not in err, err
    assert lines and "error: no space left on device writing" in lines[-1], err
    assert left == [], f"left behind on the full disk: {left}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny fp16 Llama, its Q4_0 copy and that copy as a GGUF file, all outside the tmpfs."""
    from lowbit.cli import main

    tmp = tmp_path_factory.mktemp("full-disk")
    fp16_llama_folder(tmp / "fp16")
    assert main(["quantize", str(tmp / "fp16"), "--method", "q4_0", "-o", str(tmp / "int4")]) == 0
    assert main(["export", str(tmp / "int4"), "--format", "gguf", "-o", str(tmp / "m.gguf"), "--quiet"]) == 0
    text = bundled_text("calibration")
    (tmp / "train.txt").write_text(text[:20000])
    (tmp / "eval.txt").write_text(text[20000:24000])
    return tmp


SLOW = pytest.mark.slow   # the same writers as a default case; each run is a fresh interpreter (seconds)
CASES = [
    # (name, arguments, tmpfs size): every size is far below the output, above a filesystem's bookkeeping
    ("import gguf", ["import", "m.gguf", "--format", "gguf", "-o", "{out}", "--quiet"], "64k"),
    ("compare", ["compare", "fp16", "--methods", "fp16,rtn-int4-g32", "--samples", "4", "--max-eval-tokens", "300",
                 "--context", "64", "--no-speed", "--out", "{out}"], "12k"),
    ("finetune", ["finetune", "fp16", "-o", "{out}", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                  "--rank", "4", "--target", "q_proj,v_proj", "--compute-dtype", "fp32", "--train-file", "train.txt",
                  "--eval-file", "eval.txt", "--quiet"], "8k"),
    pytest.param("quantize", ["quantize", "fp16", "--method", "rtn-int4-g32", "-o", "{out}"], "64k", marks=SLOW),
    pytest.param("export gguf", ["export", "int4", "--format", "gguf", "-o", "{out}.gguf", "--quiet"], "64k",
                 marks=SLOW),
]


@pytest.mark.parametrize("case,args,size", CASES)
def test_a_real_full_disk_is_one_line_and_leaves_nothing(workdir, case, args, size):
    rc, err, left = on_full_disk(args, size, workdir)
    assert_one_line_full_disk(rc, err, left)
