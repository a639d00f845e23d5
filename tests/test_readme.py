"""The README's Python examples run as written (in order, in one interpreter, in a fresh folder)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 3


def test_readme_python_examples_run(tmp_path):
    script = "\n".join(python_blocks())
    (tmp_path / "readme.py").write_text(script)
    done = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "tiny-gptq" / "config.json").is_file()
    assert (tmp_path / "out" / "tiny-Q4_K_M.gguf").is_file()
