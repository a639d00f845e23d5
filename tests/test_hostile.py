"""The hostile-input catalogue: broken, lying or malicious inputs and bad flags, each run through the CLI.

Every case must end with a non-zero exit, one or two lines on stderr, no traceback, nothing written where
the output would have gone (no half-written folder, no hidden .tmp), and no code from the input executed.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from tests.conftest import fp16_llama_folder

CASES: dict = {}


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


# ---------------------------------------------------------------------------------------------------
# Inputs

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny fp16 Llama folder (2 layers, hidden 64) with the bundled tokenizer."""
    root = tmp_path_factory.mktemp("hostile-base")
    fp16_llama_folder(root / "hf")
    assert main(["quantize", str(root / "hf"), "--method", "rtn-int4-g32", "--quiet", "-o", str(root / "native")]) == 0
    return root


def copy_of(base: Path, which: str, tmp: Path) -> Path:
    dst = tmp / "model"
    shutil.copytree(base / which, dst)
    return dst


def write_safetensors_raw(path: Path, header, data: bytes = b"", length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def edit_tensors(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def quantize(folder, tmp, *extra):
    return ["quantize", str(folder), "--quiet", "-o", str(tmp / "out"), *extra]


def corrupt_header(fn):
    """A case whose model.safetensors is rewritten from its parsed header by fn(header, data) -> (header, data)."""
    def make(base, tmp):
        m = copy_of(base, "hf", tmp)
        blob = (m / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
        header, data = fn(header, data)
        write_safetensors_raw(m / "model.safetensors", header, data)
        return quantize(m, tmp)
    return make


def first_key(header) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


# ---------------------------------------------------------------------------------------------------
# safetensors files

@case("safetensors truncated")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return quantize(m, tmp)


@case("safetensors empty file")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    (m / "model.safetensors").write_bytes(b"")
    return quantize(m, tmp)


@case("safetensors header length huge")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    write_safetensors_raw(m / "model.safetensors", b"{}", length=2 ** 62)
    return quantize(m, tmp)


@case("safetensors header length past the end")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    write_safetensors_raw(m / "model.safetensors", b"{}" + b" " * 100, length=5000)
    return quantize(m, tmp)


@case("safetensors header not JSON")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    write_safetensors_raw(m / "model.safetensors", b"this is not json at all")
    return quantize(m, tmp)


@case("safetensors header a JSON list")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    write_safetensors_raw(m / "model.safetensors", [1, 2, 3])
    return quantize(m, tmp)


def _past_end(h, d):
    h[first_key(h)]["data_offsets"] = [0, len(d) + 1000]
    return h, d


def _overlap(h, d):
    keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = h[keys[0]], h[keys[1]]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
    return h, d


def _unknown_dtype(h, d):
    h[first_key(h)]["dtype"] = "Q7_WEIRD"
    return h, d


def _size_mismatch(h, d):
    h[first_key(h)]["shape"] = [3, 5]
    return h, d


def _negative_shape(h, d):
    h[first_key(h)]["shape"] = [-1, 64]
    return h, d


def _offsets_not_ints(h, d):
    h[first_key(h)]["data_offsets"] = ["a", None]
    return h, d


case("safetensors offsets past the end")(corrupt_header(_past_end))
case("safetensors overlapping offsets")(corrupt_header(_overlap))
case("safetensors unknown dtype")(corrupt_header(_unknown_dtype))
case("safetensors shape disagrees with offsets")(corrupt_header(_size_mismatch))
case("safetensors negative shape")(corrupt_header(_negative_shape))
case("safetensors offsets not integers")(corrupt_header(_offsets_not_ints))


# ---------------------------------------------------------------------------------------------------
# Weights against the config

@case("tensor shape differs from the config")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_tensors(m, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(100, 64, dtype=torch.float16)}))
    return quantize(m, tmp)


@case("tensor dtype is an integer")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_tensors(m, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.int32)}))
    return quantize(m, tmp)


@case("missing tensor")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_tensors(m, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
    return quantize(m, tmp)


@case("unexpected tensor")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_tensors(m, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(4, dtype=torch.float16)}))
    return quantize(m, tmp)


@case("--skip '*' quantises nothing")
def _(base, tmp):
    return quantize(base / "hf", tmp, "--skip", "*")


def _smaller_vocabulary(tensors):
    for k in [k for k in tensors if "embed_tokens" in k or "lm_head" in k]:
        tensors[k] = tensors[k][:512].clone()


@case("tokenizer of another model (ids past the embedding)")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_tensors(m, _smaller_vocabulary)
    edit_json(m / "config.json", lambda d: d.update(vocab_size=512))
    return quantize(m, tmp, "--method", "gptq-int4-g32", "--samples", "2")


@case("config hidden size 1e9")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_json(m / "config.json", lambda c: c.update(hidden_size=10 ** 9, intermediate_size=10 ** 9))
    return quantize(m, tmp)


@case("config vocabulary 1e10")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_json(m / "config.json", lambda c: c.update(vocab_size=10 ** 10))
    return quantize(m, tmp)


@case("config.json not JSON")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    (m / "config.json").write_text("{ nope")
    return quantize(m, tmp)


@case("NaN in the embedding")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_tensors(m, lambda t: t["model.embed_tokens.weight"].__setitem__((3, 5), float("nan")))
    return quantize(m, tmp)


@case("Inf in a Linear weight")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_tensors(m, lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((0, 0), float("inf")))
    return quantize(m, tmp)


@case("NaN in the embedding, export")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    edit_tensors(m, lambda t: t["model.embed_tokens.weight"].__setitem__((3, 5), float("nan")))
    return ["export", str(m), "--format", "gguf", "--type", "Q8_0", "-o", str(tmp / "out")]


# ---------------------------------------------------------------------------------------------------
# Pickles and remote code

PWNED = "/tmp/lowbit-hostile-pwned"


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


@case("pickle checkpoint only")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    (m / "model.safetensors").unlink()
    import pickle
    (m / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    return quantize(m, tmp)


@case("pickle checkpoint beside nothing, eval")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    (m / "model.safetensors").unlink()
    import pickle
    (m / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    return ["eval", str(m), "--no-speed"]


def _auto_map(base, tmp):
    m = copy_of(base, "hf", tmp)
    (m / "evil.py").write_text(f"import os\nos.system('touch {PWNED}')\n")
    edit_json(m / "config.json", lambda c: c.update(model_type="evil_llama",
                                                   auto_map={"AutoConfig": "evil.EvilConfig",
                                                             "AutoModelForCausalLM": "evil.EvilModel"}))
    return m


@case("auto_map without --trust-remote-code, quantize")
def _(base, tmp):
    return quantize(_auto_map(base, tmp), tmp)


@case("auto_map without --trust-remote-code, eval")
def _(base, tmp):
    return ["eval", str(_auto_map(base, tmp)), "--no-speed"]


@case("auto_map without --trust-remote-code, compare")
def _(base, tmp):
    return ["compare", str(_auto_map(base, tmp)), "--methods", "rtn-int8", "--no-speed", "--out", str(tmp / "out")]


@case("auto_map without --trust-remote-code, export")
def _(base, tmp):
    return ["export", str(_auto_map(base, tmp)), "--format", "gguf", "-o", str(tmp / "out")]


# ---------------------------------------------------------------------------------------------------
# Native folders

def native_eval(base, tmp, fn):
    m = copy_of(base, "native", tmp)
    fn(m)
    return ["eval", str(m), "--no-speed", "--max-eval-tokens", "64"]


@case("native NaN scales")
def _(base, tmp):
    def poison(m):
        edit_tensors(m, lambda t: next(v for k, v in t.items() if k.endswith("scales")).fill_(float("nan")))
    return native_eval(base, tmp, poison)


@case("native config names a missing layer")
def _(base, tmp):
    def lie(m):
        def add(c):
            c["modules"]["model.layers.9.mlp.up_proj"] = next(iter(c["modules"].values()))
        edit_json(m / "lowbit_config.json", add)
    return native_eval(base, tmp, lie)


@case("native config modules not a dict")
def _(base, tmp):
    return native_eval(base, tmp, lambda m: edit_json(m / "lowbit_config.json", lambda c: c.update(modules=[1, 2])))


@case("native config without modules")
def _(base, tmp):
    return native_eval(base, tmp, lambda m: edit_json(m / "lowbit_config.json", lambda c: c.pop("modules")))


@case("native config not JSON")
def _(base, tmp):
    return native_eval(base, tmp, lambda m: (m / "lowbit_config.json").write_bytes(b"\xff\xfe{"))


@case("native config a JSON list")
def _(base, tmp):
    return native_eval(base, tmp, lambda m: (m / "lowbit_config.json").write_text("[]"))


@case("native layout with a huge shape")
def _(base, tmp):
    def lie(m):
        def grow(c):
            layout = next(iter(c["modules"].values()))
            for k in ("in_features", "out_features"):
                if k in layout:
                    layout[k] = 10 ** 9
        edit_json(m / "lowbit_config.json", grow)
    return native_eval(base, tmp, lie)


@case("generation_config.json a JSON list, eval")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    (m / "generation_config.json").write_text("[1, 2]")
    return ["eval", str(m), "--no-speed", "--max-eval-tokens", "64"]


@case("native generation_config.json not JSON, export")
def _(base, tmp):
    m = copy_of(base, "native", tmp)
    (m / "generation_config.json").write_bytes(b"\xff{")
    return ["export", str(m), "--format", "gptq", "-o", str(tmp / "out")]


@case("native weights truncated")
def _(base, tmp):
    def cut(m):
        f = m / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    return native_eval(base, tmp, cut)


@case("native export with NaN scales")
def _(base, tmp):
    m = copy_of(base, "native", tmp)
    edit_tensors(m, lambda t: next(v for k, v in t.items() if k.endswith("scales")).fill_(float("inf")))
    return ["export", str(m), "--format", "gptq", "-o", str(tmp / "out")]


# ---------------------------------------------------------------------------------------------------
# Text inputs and flags

@case("non-UTF-8 calibration text")
def _(base, tmp):
    (tmp / "calib.txt").write_bytes(b"hello \xff\xfe world " * 50)
    return quantize(base / "hf", tmp, "--calibration", str(tmp / "calib.txt"))


@case("calibration path that does not exist, with a space")
def _(base, tmp):
    return quantize(base / "hf", tmp, "--calibration", str(tmp / "my data" / "calib.txt"))


@case("non-UTF-8 eval text")
def _(base, tmp):
    (tmp / "eval.txt").write_bytes(b"\xff\xfe" * 100)
    return ["eval", str(base / "hf"), "--no-speed", "--text", str(tmp / "eval.txt")]


@case("negative --samples")
def _(base, tmp):
    return quantize(base / "hf", tmp, "--samples", "-5")


@case("--method rtn-int4-g128 --bits 8")
def _(base, tmp):
    return quantize(base / "hf", tmp, "--method", "rtn-int4-g128", "--bits", "8")


@case("unknown method")
def _(base, tmp):
    return quantize(base / "hf", tmp, "--method", "magic-int3")


@case("calc --group-size without --bits")
def _(base, tmp):
    return ["calc", "memory", "--params", "7e9", "--group-size", "128"]


@case("calc --params inf")
def _(base, tmp):
    return ["calc", "memory", "--params", "inf", "--json"]


@case("calc --params nan")
def _(base, tmp):
    return ["calc", "memory", "--params", "nan"]


@case("gptq on a folder without a tokenizer")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (m / name).unlink()
    return quantize(m, tmp, "--method", "gptq-int4-g32")


@case("--seq-len beyond the model's context")
def _(base, tmp):
    return quantize(base / "hf", tmp, "--seq-len", "4096", "--samples", "2")


@case("eval --context beyond the model's context")
def _(base, tmp):
    return ["eval", str(base / "hf"), "--no-speed", "--context", "4096"]


@case("--threads 0")
def _(base, tmp):
    return quantize(base / "hf", tmp, "--threads", "0")


@case("compare --samples -1")
def _(base, tmp):
    return ["compare", str(base / "hf"), "--samples", "-1", "--out", str(tmp / "out")]


# ---------------------------------------------------------------------------------------------------
# Output paths (checked before any work)

@case("output already exists")
def _(base, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return quantize(base / "hf", tmp)


@case("output parent is a file")
def _(base, tmp):
    (tmp / "file").write_text("x")
    return ["quantize", str(base / "hf"), "--quiet", "-o", str(tmp / "file" / "out")]


@case("output parent is read-only")
def _(base, tmp):
    if os.geteuid() == 0:
        pytest.skip("root ignores permissions")
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return ["quantize", str(base / "hf"), "--quiet", "-o", str(tmp / "ro" / "out")]


@case("export output parent is a file")
def _(base, tmp):
    (tmp / "file").write_text("x")
    return ["export", str(base / "native"), "--format", "gptq", "-o", str(tmp / "file" / "out")]


@case("import output already exists")
def _(base, tmp):
    (tmp / "out").mkdir()
    (tmp / "g.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    return ["import", str(tmp / "g.gguf"), "--format", "gguf", "-o", str(tmp / "out")]


@case("compare --out onto an existing report")
def _(base, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "compare.json").write_text("[]")
    return ["compare", str(base / "hf"), "--methods", "rtn-int8", "--no-speed", "--out", str(tmp / "out")]


@case("gptq import of a truncated folder")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    return ["import", str(m), "--format", "gptq", "-o", str(tmp / "out")]


@case("gptq import of a pickle-only folder")
def _(base, tmp):
    m = copy_of(base, "hf", tmp)
    (m / "model.safetensors").unlink()
    import pickle
    (m / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    return ["import", str(m), "--format", "gptq", "-o", str(tmp / "out")]


# ---------------------------------------------------------------------------------------------------
# GGUF files

@case("gguf truncated")
def _(base, tmp):
    (tmp / "g.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0\0")
    return ["import", str(tmp / "g.gguf"), "--format", "gguf", "-o", str(tmp / "out")]


@case("gguf huge tensor count")
def _(base, tmp):
    (tmp / "g.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2 ** 60, 2 ** 60))
    return ["import", str(tmp / "g.gguf"), "--format", "gguf", "-o", str(tmp / "out")]


@case("gguf not a gguf")
def _(base, tmp):
    (tmp / "g.gguf").write_bytes(b"hello world, definitely not gguf" * 10)
    return ["eval", str(tmp / "g.gguf"), "--no-speed"]


# ---------------------------------------------------------------------------------------------------

def _listing(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_in_one_line(name, base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_DEBUG", "")
    monkeypatch.delenv("LOWBIT_DEBUG")
    argv = CASES[name](base, tmp_path)
    before = _listing(tmp_path)
    Path(PWNED).unlink(missing_ok=True)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    finally:
        for p in tmp_path.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None), f"exit {rc}"
    assert "Traceback" not in err
    assert 1 <= len(lines) <= 2, err
    assert _listing(tmp_path) == before, "output left behind"
    assert not Path(PWNED).exists(), "code from the input ran"
    if "--trust-remote-code" in err:  # the hint names a flag this command has
        from lowbit.cli import build_parser

        command = build_parser()._subparsers._group_actions[0].choices[argv[0]]
        assert "--trust-remote-code" in command._option_string_actions



def test_catalogue_size():
    assert len(CASES) >= 40
