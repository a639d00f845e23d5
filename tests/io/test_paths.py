"""The file a user gets does not depend on the path taken (issue 11). For each export format and a handful
of recipes, three paths from the same Hugging Face folder write the same file:

    (a) api: load_model, quantize, export from memory;
    (b) api: the same model saved natively, loaded back with lowbit.load, exported;
    (c) cli: `lowbit quantize FOLDER ... -o Q` then `lowbit export Q --format F`;
    (d) for a GGUF file type: `lowbit export FOLDER --format gguf --type T`, rounding the float model
        itself, equals quantising with the file type's method first.

Every format lowbit writes is deterministic, so the comparison is bytes; before it, the files are parsed
(GGUF with gguf-py's reader, safetensors headers and tensors, JSON) so that a failure names the key or
tensor that moved. The native folders of (a) and (c) are compared the same way. The cases cover what such
paths lose: tied embeddings, GGUF types chosen by layer index and by the GQA ratio, skipped layers, a
scaled RoPE, fp16 sources, GPT-2's Conv1D layers. Before the fixes, GGUF's general.name was the folder
the model was last loaded from (b and c differed from a), `--skip A --skip B` kept only B, GPT-2's
float Conv1D layers were written to Hugging Face folders in lowbit's [out, in] layout (transformers read
c_proj transposed, or failed on the shape), and calibrating by samples (an encoder) left truncation at
the calibration length in the saved tokenizer.json (a reloaded folder's tokenizer_config then differed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as t

from lowbit import api
from lowbit.cli import main
from lowbit.methods.recipe import DEFAULT_SKIP, Recipe
from tests.conftest import ENCODERS, fp16_llama_folder, tiny_config

SAMPLES, SEQ_LEN = 4, 32


@dataclass(frozen=True)
class Case:
    family: str
    method: str
    formats: tuple[str, ...]
    skip: tuple[str, ...] = ()
    config: tuple = ()          # (attribute, value) set on the family's tiny config
    fp16: bool = False          # the bundled-tokenizer fp16 Llama folder instead
    gguf_type: str | None = None  # also (d): `lowbit export FOLDER --format gguf --type T` from the float folder


# A Llama whose rows are a multiple of 256, so Q4_K_M chooses per tensor: attn_v and ffn_down get Q6_K on
# some layers only (by layer index), token_embd takes the output's type when tied, and the GQA ratio is 4.
GQA4_TIED = (("hidden_size", 256), ("intermediate_size", 512), ("num_attention_heads", 8),
             ("num_key_value_heads", 2), ("head_dim", 32), ("tie_word_embeddings", True))
LLAMA3_ROPE = (("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}),)
HF_FORMATS = ("gptq", "awq", "compressed-tensors")

CASES = {
    "q4_k_m-tied-gqa4": Case("llama", "q4_k_m", ("gguf",), config=GQA4_TIED, gguf_type="Q4_K_M"),
    "gptq-skip": Case("llama", "gptq-int4-g32", ("gguf",) + HF_FORMATS, skip=("*.mlp.down_proj", "model.layers.1.*")),
    "nf4": Case("llama", "nf4", ("bnb",)),
    "aqlm-skip": Case("llama", "aqlm-r1-steps5", ("aqlm",), skip=("*.mlp.down_proj",)),
}
SLOW_CASES = {
    "rtn-int4-g32": Case("llama", "rtn-int4-g32", ("gguf",) + HF_FORMATS),
    "rtn-int8-g32-llama3-rope": Case("llama", "rtn-int8-g32", ("gguf", "gptq"), config=LLAMA3_ROPE),
    "rtn-int4-g32-fp16-source": Case("llama", "rtn-int4-g32", ("gguf",) + HF_FORMATS, fp16=True),
    "q3_k_s-gqa4": Case("llama", "q3_k_s", ("gguf",), config=GQA4_TIED[:-1], gguf_type="Q3_K_S"),
    "qwen2-tied": Case("qwen2", "rtn-int4-g32", HF_FORMATS, config=(("tie_word_embeddings", True),)),
    "gemma-tied-nf4": Case("gemma", "nf4", ("bnb",)),
    "gpt2-conv1d": Case("gpt2", "gptq-int4-g32", ("gptq", "awq"), skip=("*.mlp.c_proj", "*.attn.c_proj")),
    "phi3-fused": Case("phi3", "rtn-int4-g32", HF_FORMATS),
    "opt-w8a8": Case("opt", "w8a8", ("compressed-tensors",)),
    "bert-encoder": Case("bert", "rtn-int4-g32", HF_FORMATS),
    "qwen2_moe-experts-skipped": Case("qwen2_moe", "rtn-int4-g32", HF_FORMATS, skip=("*.mlp.experts",)),
}


# ---------------------------------------------------------------------------------------------------
# Reading the files apart

def gguf_parts(path: Path) -> dict:
    """{"kv <key>": (value type, raw bytes), "tensor <name>": (ggml type, shape, bytes)} by gguf-py."""
    from gguf import GGUFReader

    reader, out = GGUFReader(path), {}
    for field in reader.fields.values():
        if not field.name.startswith("GGUF."):
            out[f"kv {field.name}"] = ([int(x) for x in field.types], b"".join(bytes(field.parts[i]) for i in field.data))
    for tensor in reader.tensors:
        out[f"tensor {tensor.name}"] = (tensor.tensor_type.name, tuple(int(x) for x in tensor.shape),
                                        np.asarray(tensor.data).tobytes())
    return out


def safetensors_parts(path: Path) -> dict:
    """{"metadata": header metadata, "tensor <name>": (dtype, shape, bytes)}."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        out = {"metadata": f.metadata()}
        for name in f.keys():
            x = f.get_tensor(name)
            out[f"tensor {name}"] = (str(x.dtype), tuple(x.shape), x.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def parts(path: Path) -> dict:
    """Every part of a file or folder that a consumer reads, by a name that says where it is."""
    if path.is_file():
        return gguf_parts(path) if path.suffix == ".gguf" else {"bytes": path.read_bytes()}
    out = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if f.suffix == ".safetensors":
            out.update({f"{rel}: {k}": v for k, v in safetensors_parts(f).items()})
        elif f.suffix == ".json":
            out[rel] = json.loads(f.read_text())
        else:
            out[rel] = f.read_bytes()
    return out


def differences(a: Path, b: Path) -> list[str]:
    pa, pb = parts(a), parts(b)
    return sorted(k for k in pa.keys() | pb.keys() if pa.get(k, "absent") != pb.get(k, "absent"))


def same_bytes(a: Path, b: Path) -> bool:
    if a.is_file():
        return a.read_bytes() == b.read_bytes()
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and \
        all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# ---------------------------------------------------------------------------------------------------
# The three paths

def source_folder(case: Case, path: Path, tokenizer) -> Path:
    if case.fp16:
        return fp16_llama_folder(path)
    config = tiny_config(case.family)
    for key, value in case.config:
        setattr(config, key, value)
    torch.manual_seed(0)
    (t.AutoModel if case.family in ENCODERS else t.AutoModelForCausalLM).from_config(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cli(*args) -> None:
    rc = main([str(a) for a in args])
    assert rc == 0, f"lowbit {' '.join(map(str, args))} exited {rc}"


def out_name(fmt: str) -> str:
    return f"{fmt}.gguf" if fmt == "gguf" else fmt


def write_three_ways(case: Case, root: Path, tokenizer) -> Path:
    """root/{a,b,c}/<format> for every format of the case, and root/{a,c}/native."""
    src = source_folder(case, root / "src", tokenizer)
    for p in "abcd":
        (root / p).mkdir()
    model, tok = api.load_model(src)
    recipe = Recipe(case.method, skip=DEFAULT_SKIP + case.skip)
    api.quantize(model, recipe, tokenizer=tok, n_samples=SAMPLES, seq_len=SEQ_LEN, progress=False)
    api.save(model, root / "a" / "native", tokenizer=tok)
    reloaded, reloaded_tok = api.load(root / "a" / "native")
    skips = [x for s in case.skip for x in ("--skip", s)]
    cli("quantize", src, "--method", case.method, "--samples", SAMPLES, "--seq-len", SEQ_LEN, *skips, "--quiet",
        "-o", root / "c" / "native")
    for fmt in case.formats:
        api.export(model, root / "a" / out_name(fmt), format=fmt, tokenizer=tok)
        api.export(reloaded, root / "b" / out_name(fmt), format=fmt, tokenizer=reloaded_tok)
        cli("export", root / "c" / "native", "--format", fmt, "--quiet", "-o", root / "c" / out_name(fmt))
    if case.gguf_type:
        cli("export", src, "--format", "gguf", "--type", case.gguf_type, "--quiet", "-o", root / "d" / out_name("gguf"))
    return root


def check_paths(case: Case, root: Path) -> None:
    for name in ("native",) + tuple(out_name(f) for f in case.formats):
        a = root / "a" / name
        for other in ("b", "c", "d"):
            b = root / other / name
            if not b.exists():
                continue        # (b) has no native folder of its own (it is (a)'s), (d) only a GGUF file
            assert differences(a, b) == [], f"{name}: path ({other}) differs from (a)"
            assert same_bytes(a, b), f"{name}: path ({other}) parses the same but is not the same bytes"


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_tokenizer, one_thread):
    cache = {}

    def get(case_id: str, case: Case) -> Path:
        if case_id not in cache:
            cache[case_id] = write_three_ways(case, tmp_path_factory.mktemp(case_id), tiny_tokenizer)
        return cache[case_id]
    return get


@pytest.mark.parametrize("case_id", CASES)
def test_every_path_writes_the_same_file(written, case_id):
    check_paths(CASES[case_id], written(case_id, CASES[case_id]))


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SLOW_CASES)
def test_every_path_writes_the_same_file_broadly(written, case_id):
    check_paths(SLOW_CASES[case_id], written(case_id, SLOW_CASES[case_id]))


def test_the_cases_exercise_what_they_claim(written):
    """Q4_K_M on the GQA-4 tied Llama chooses types by layer, and takes token_embd from the output's rule;
    the skip case keeps down_proj and the whole of layer 1 in float, in every format."""
    from gguf import GGUFReader

    kinds = {x.name: x.tensor_type.name for x in GGUFReader(written("q4_k_m-tied-gqa4", CASES["q4_k_m-tied-gqa4"])
                                                          / "c" / "gguf.gguf").tensors}
    assert "output.weight" not in kinds and kinds["token_embd.weight"] == "Q6_K"
    assert {kinds["blk.0.attn_v.weight"], kinds["blk.1.attn_v.weight"]} == {"Q4_K", "Q6_K"}
    root = written("gptq-skip", CASES["gptq-skip"])
    stored = safetensors_parts(root / "c" / "gptq" / "model.safetensors")
    assert "tensor model.layers.0.mlp.down_proj.weight" in stored and "tensor model.layers.1.mlp.up_proj.weight" in stored
    assert "tensor model.layers.0.mlp.up_proj.qweight" in stored
    native = json.loads((root / "c" / "native" / "lowbit_config.json").read_text())
    assert sorted(native["modules"]) == sorted(f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))


def test_a_gguf_imported_saved_and_exported_again_keeps_its_metadata(written, tiny_tokenizer, tmp_path):
    """GGUF -> lowbit.load -> native folder -> load -> GGUF: general.name stays the source model's, the
    file type stays Q4_K_M (it became Q4_K_S, the most common block type) and the padding token id is
    kept (the reader looked for tokenizer.ggml.pad_token_id; gguf-py writes padding_token_id). Every
    held block is copied. token_embd, which lowbit holds in float, is rounded again by the file type's
    rules and may differ (still open: a GGUF import does not keep the embedding's blocks)."""
    root = written("q4_k_m-tied-gqa4", CASES["q4_k_m-tied-gqa4"])
    first = root / "c" / "gguf.gguf"
    model, tok = api.load(first)
    api.save(model, tmp_path / "again", tokenizer=tok)
    again, tok = api.load(tmp_path / "again")
    api.export(again, tmp_path / "again.gguf", format="gguf", tokenizer=tok)
    assert differences(first, tmp_path / "again.gguf") in ([], ["tensor token_embd.weight"])
    from gguf import GGUFReader

    assert GGUFReader(first).fields["general.name"].contents() == "src"


def gpt2_with_float_conv1d(method: str):
    """A tiny GPT-2 quantised with attn.c_proj (square: a transposition fits its shape) kept in float."""
    from tests.conftest import build_tiny_model

    model = build_tiny_model("gpt2")
    api.quantize(model, Recipe(method, skip=DEFAULT_SKIP + ("*.attn.c_proj",)), progress=False)
    return model


def test_gpt2_float_conv1d_layers_are_written_as_transformers_reads_them(tmp_path):
    """GPT-2 holds c_attn/c_proj/c_fc as Conv1D, weight [in, out]; lowbit holds them as Linears. A float
    one must go back to [in, out] in a Hugging Face folder: transformers (with bitsandbytes) then reads the
    bnb export as the quantised model (before: attn.c_proj loaded transposed). bnb dequantises exactly in
    train mode (in eval mode on a CPU with AVX512-BF16 it repacks for a bf16 kernel, tests/io/test_bnb.py),
    so dropout is set to 0 and the logits are compared in train mode, to fp32 accumulation order."""
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    model = gpt2_with_float_conv1d("nf4")
    api.export(model, tmp_path / "bnb", format="bnb")
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", dtype=torch.float32, resid_pdrop=0.0,
                                                    embd_pdrop=0.0, attn_pdrop=0.0).train()
    assert torch.equal(theirs.transformer.h[1].attn.c_proj.weight, model.transformer.h[1].attn.c_proj.weight.T)
    ours, _ = api.load_model(tmp_path / "bnb")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours(input_ids=ids).logits, want)


def test_compressed_tensors_refuses_quantised_conv1d_layers(tmp_path):
    """transformers builds GPT-2's layers as Conv1D, which compressed-tensors never quantises: loading such
    an export left c_attn/c_fc randomly initialised (logits off by 0.53). Refused in one line instead."""
    from lowbit.errors import LowbitError

    model = gpt2_with_float_conv1d("rtn-int4-g32")
    with pytest.raises(LowbitError) as e:
        api.export(model, tmp_path / "ct", format="compressed-tensors")
    assert "\n" not in str(e.value) and "Conv1D" in str(e.value) and "gptq, awq or bnb" in str(e.value)
    assert list(tmp_path.iterdir()) == []
