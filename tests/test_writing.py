"""Writing outputs: temp + rename, nothing left behind on errors, Ctrl-C, SIGTERM or a full disk, and
permissions that follow the umask."""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_output, check_output, write_bytes
from tests.conftest import fp16_llama_folder


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_output(tmp_path / "folder", folder=True) as tmp:
            (tmp / "a.json").write_text("{}")
        write_bytes(tmp_path / "file.bin", b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "folder") == 0o777 & ~mask
    assert mode(tmp_path / "folder" / "a.json") == 0o666 & ~mask
    assert mode(tmp_path / "file.bin") == 0o666 & ~mask


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(1)])
def test_every_exit_removes_the_temporary(tmp_path, exc):
    with pytest.raises(type(exc)):
        with atomic_output(tmp_path / "out", folder=True) as tmp:
            (tmp / "big").write_bytes(b"0" * 1000)
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_naming_the_output(tmp_path):
    with pytest.raises(LowbitError, match=r"^no space left on device writing .*out$"):
        with atomic_output(tmp_path / "out", folder=False):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(LowbitError, match="no space left"):
        with atomic_output(tmp_path / "out", folder=True):
            raise RuntimeError("I/O error: No space left on device (os error 28)")  # safetensors' own error
    assert list(tmp_path.iterdir()) == []


def test_bad_output_paths_are_found_before_work(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(LowbitError, match="already exists"):
        check_output(tmp_path / "f")
    with pytest.raises(LowbitError, match="is a file"):
        check_output(tmp_path / "f" / "sub" / "out")
    assert check_output(tmp_path / "new" / "deeper" / "out") == tmp_path / "new" / "deeper" / "out"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lowbit-probe")]   # the probe cleaned up


def test_a_broken_link_or_a_name_too_long_is_found_before_work(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "dir")
    with pytest.raises(LowbitError, match="is a broken symbolic link"):
        check_output(tmp_path / "dangling" / "out")
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(LowbitError, match="is a broken symbolic link"):
        check_output(tmp_path / "loop" / "out")
    # fits the file system by itself, not with the temporary's prefix and suffix
    with pytest.raises(LowbitError, match="too long for the file system"):
        check_output(tmp_path / ("n" * 250))
    assert check_output(tmp_path / ("n" * 200)) == tmp_path / ("n" * 200)


def test_a_long_error_message_is_shortened(capsys, tmp_path):
    rc = main(["eval", str(tmp_path / ("x" * 3000))])
    err = capsys.readouterr().err
    assert rc == 2 and len(err) < 1200 and "characters left out" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_refuses_writes_is_found_before_work_even_for_root():
    # os.access says yes to root for /proc; the write would fail only after the quantisation
    with pytest.raises(LowbitError, match="/proc is not writable"):
        check_output("/proc/lowbit-out/model")


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    import lowbit.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["demo"].set_defaults(run=interrupted)
    rc = main(["demo", "basics"])
    err = capsys.readouterr().err
    assert rc == 130 and err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def test_sigterm_during_a_write_leaves_nothing(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        import lowbit.cli as cli
        from lowbit.io.atomic import atomic_output

        def slow(args):
            with atomic_output(Path({str(tmp_path / 'out')!r}), folder=True) as tmp:
                (tmp / "part").write_bytes(b"0" * 100000)
                print("writing", flush=True)
                time.sleep(30)
        parser = cli.build_parser()
        parser._subparsers._group_actions[0].choices["demo"].set_defaults(run=slow)
        cli.build_parser = lambda: parser
        sys.exit(cli.main(["demo", "basics"]))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_version_and_a_broken_pipe(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("lowbit ")
    src = str(Path(__file__).resolve().parents[1] / "src")
    p = subprocess.run(f"{sys.executable} -m lowbit demo memory | head -1", shell=True, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": src})
    assert "Traceback" not in p.stderr and "Broken pipe" not in p.stderr


def test_unquantised_tensors_keep_the_input_dtype(tmp_path, capsys):
    """An fp16 model's embeddings and norms stay fp16: the int4 folder is far smaller than the fp16 input."""
    import json

    from safetensors import safe_open

    fp16_llama_folder(tmp_path / "hf")
    assert main(["quantize", str(tmp_path / "hf"), "--method", "rtn-int4-g32", "--quiet", "-o", str(tmp_path / "q")]) == 0
    assert "MB of weights" in capsys.readouterr().out
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
        assert f.get_slice("model.norm.weight").get_dtype() == "F16"
    assert json.loads((tmp_path / "q" / "config.json").read_text()).get("dtype", "float16") == "float16"
    fp16 = (tmp_path / "hf" / "model.safetensors").stat().st_size
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < fp16  # fp32 embeddings made it larger
    mask = os.umask(0)
    os.umask(mask)
    assert mode(tmp_path / "q" / "model.safetensors") == 0o666 & ~mask and mode(tmp_path / "q") == 0o777 & ~mask
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q"), "--no-speed", "--max-eval-tokens", "64", "--json"]) == 0
    promised = json.loads(capsys.readouterr().out)["memory_bytes"]
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert abs(size - promised) < 0.05 * promised, (size, promised)  # the folder is the size eval promises
