"""Bounded fuzzing of the readers that take untrusted bytes: the safetensors header validator, the native
lowbit_config.json reader and the GGUF reader. Anything but a model or a one-line LowbitError is a bug, and
no input may make a reader allocate far beyond the file's size."""
from __future__ import annotations

import json
import resource
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.pipeline.checkpoint import read_header
from tests.conftest import build_tiny_model

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loads_or_refuses(load, path, max_growth_mb: float = 500) -> None:
    """load(path) returns or raises a one-line LowbitError, and the process's peak memory barely grows."""
    before = peak_rss_mb()
    try:
        load(path)
    except LowbitError as e:
        assert "\n" not in str(e)
    assert peak_rss_mb() - before < max_growth_mb


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("fuzz-st") / "m.safetensors"
    save_file({"a": torch.arange(12, dtype=torch.float16).reshape(3, 4), "b": torch.ones(5, dtype=torch.int32),
               "c": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


def mutate(data: bytes, edits, cut) -> bytes:
    out = bytearray(data)
    for pos, byte in edits:
        out[pos % len(out)] = byte
    return bytes(out[:cut]) if cut is not None else bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=6)


@FUZZ
@given(edits=EDITS, cut=st.none() | st.integers(0, 400))
def test_safetensors_validator_accepts_only_what_safetensors_reads(small_safetensors, tmp_path, edits, cut):
    from safetensors import safe_open

    path = tmp_path / "f.safetensors"
    path.write_bytes(mutate(small_safetensors, edits, cut))
    before = peak_rss_mb()
    try:
        header = read_header(path)
    except LowbitError as e:
        assert "\n" not in str(e)
        return
    with safe_open(str(path), framework="pt") as f:  # what the validator passes, safetensors reads
        assert set(f.keys()) == set(header)
        for k in f.keys():
            f.get_tensor(k)
    assert peak_rss_mb() - before < 200


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory):
    from lowbit import RTN, api

    model = build_tiny_model("llama")
    api.quantize(model, RTN(bits=4, group_size=32), progress=False)
    return api.save(model, tmp_path_factory.mktemp("fuzz-native") / "q")


@FUZZ
@given(layout=JSON, name=st.sampled_from(["model.layers.0.mlp.up_proj", "model.layers.0", "lm_head", "x.y", ""]),
       key=st.sampled_from(["in_features", "out_features", "spec", "module", "bias", "g_idx", None]))
def test_native_config_reader_never_crashes(native_folder, tmp_path, layout, name, key):
    from lowbit.io.native import load

    folder = tmp_path / "n"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(native_folder, folder)
    meta = json.loads((folder / "lowbit_config.json").read_text())
    if key is None:
        meta["modules"][name] = layout
    else:
        target = meta["modules"].get(name) or next(iter(meta["modules"].values()))
        target[key] = layout
    (folder / "lowbit_config.json").write_text(json.dumps(meta))
    loads_or_refuses(load, folder)


@pytest.fixture(scope="module")
def small_gguf(tiny_tokenizer, tmp_path_factory):
    from lowbit.io.gguf import export_gguf

    return export_gguf(build_tiny_model("llama"), tmp_path_factory.mktemp("fuzz-gguf") / "s.gguf", type="Q8_0",
                       tokenizer=tiny_tokenizer).read_bytes()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
       wide=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 2 ** 64 - 1)), max_size=2))
def test_gguf_reader_never_crashes(small_gguf, tmp_path, edits, wide):
    from lowbit.io.gguf_read import load_gguf

    data = bytearray(mutate(small_gguf, edits, None))
    for pos, value in wide:  # a whole count, length or offset replaced by a hostile 64-bit value
        data[pos:pos + 8] = struct.pack("<Q", value)
    path = tmp_path / "f.gguf"
    path.write_bytes(bytes(data))
    loads_or_refuses(load_gguf, path)
