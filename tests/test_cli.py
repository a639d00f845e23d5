import json
import subprocess
import sys


from lowbit.cli import main


def run_cli(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_calc_memory_json(capsys):
    rc, out, _ = run_cli(capsys, "calc", "memory", "--params", "70e9", "--json")
    rows = {r["precision"]: r["gb"] for r in json.loads(out)}
    assert rc == 0 and [rows[p] for p in ("fp32", "fp16", "int8", "int4", "int2")] == [280, 140, 70, 35, 17.5]


def test_calc_kv_cache_json(capsys):
    rc, out, _ = run_cli(capsys, "calc", "kv-cache", "--layers", "80", "--kv-heads", "64", "--head-dim", "128",
                         "--seq-len", "131072", "--dtype", "fp16", "--json")
    r = json.loads(out)
    assert rc == 0 and round(r["gb"], 1) == 343.6 and r["gib"] == 320


def test_user_error_is_one_line_and_nonzero(capsys):
    rc, out, err = run_cli(capsys, "calc", "kv-cache", "--layers", "80", "--kv-heads", "8", "--head-dim", "128",
                           "--seq-len", "4096", "--dtype", "fp12")
    assert rc != 0 and out == "" and err.count("\n") == 1 and "unknown dtype" in err


def test_demo_prints_exercises(capsys):
    rc, out, _ = run_cli(capsys, "demo", "basics")
    assert rc == 0 and "Exercise 1" in out and "Exercise 3" in out


def test_console_entry_point_without_traceback():
    p = subprocess.run([sys.executable, "-m", "lowbit", "calc", "memory", "--params", "-1"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "positive" in p.stderr


def test_threads_sets_torch_threads_before_the_work(tmp_path, capsys, monkeypatch):
    """--threads N is honoured (issue 14: torch's default on a busy 2-core machine cost 25x the CPU time)."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "2")   # --threads sets it for child processes: restored after the test
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["export", "--format", "nope", "--threads", "1", "-o", str(tmp_path / "x")]) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
