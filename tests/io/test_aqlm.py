"""The AQLM checkpoint layout (io/aqlm.py): export -> import gives back the same model bit for bit; the
stored tensors decode, by an independent reading of shared/formats.md §10, to lowbit's weights; the aqlm
package's own decoding and transformers (which swaps in aqlm.QuantizedLinear) agree; bad input is refused in
one line with nothing written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.io import get_exporter, get_importer
from lowbit.io.aqlm import aqlm_problem
from lowbit.methods import Recipe
from lowbit.methods.recipe import DEFAULT_SKIP
from lowbit.nn import AQLMLinear
from lowbit.pipeline.loading import set_module
from lowbit.weights.codebook import AQLMWeight
from tests.conftest import build_tiny_model

CALIB = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
FAST_2X8 = "aqlm-r1-steps5"     # the layout is under test, not the search


def quantised(arch: str, recipe=FAST_2X8, fp16_floats: bool = False):
    model = build_tiny_model(arch)
    if fp16_floats:   # every float parameter an fp16 value, so that the default fp16 export loses nothing
        for p in model.parameters():
            p.data = p.data.half().float()
    return api.quantize(model, recipe, calibration=CALIB, progress=False)


def random_aqlm(arch: str, codebooks: int, bits: int, seed: int = 0):
    """A tiny model whose Linears (all but the head) are AQLM weights with random codes over the whole range
    (so codes >= 2^(bits-1) are stored negative), random fp16 codebooks and positive fp16 scales. Stands in
    for the method where it is slow: 1x16 k-means over 65,536 centroids takes a minute per tiny model."""
    model, gen = build_tiny_model(arch), torch.Generator().manual_seed(seed)
    for name, m in list(model.named_modules()):
        if type(m) is not torch.nn.Linear or name == "lm_head":
            continue
        n_out, n_in = m.weight.shape
        codes = torch.randint(0, 1 << bits, (n_out, n_in // 8, codebooks), generator=gen)
        codes = codes.to(torch.uint8) if bits == 8 else torch.where(codes >= 1 << 15, codes - (1 << 16),
                                                                    codes).to(torch.int16)
        books = (torch.randn(codebooks, 1 << bits, 8, generator=gen) * 0.5).half()
        scales = (torch.rand(n_out, generator=gen) + 0.5).half()
        set_module(model, name, AQLMLinear.from_weight(AQLMWeight(codes, books, scales), m.bias))
    return model


CASES = {"llama-2x8": lambda: quantised("llama"), "opt-2x8-bias": lambda: quantised("opt"),
         "llama-1x16": lambda: random_aqlm("llama", 1, 16), "qwen2-1x16-bias": lambda: random_aqlm("qwen2", 1, 16),
         "llama-2x16": lambda: random_aqlm("llama", 2, 16, seed=1)}


pytestmark = pytest.mark.usefixtures("one_thread")   # models are built inside the tests, on one thread


@pytest.fixture(scope="module")
def model_of():
    cache = {}

    def get(case: str):
        if case not in cache:
            cache[case] = CASES[case]()
        return cache[case]
    return get


def aqlm_modules(model) -> dict[str, AQLMLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AQLMLinear)}


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------
# 1. Round trip

@pytest.mark.parametrize("case", CASES)
def test_export_import_gives_back_the_same_model_bit_for_bit(model_of, case, tmp_path):
    model = model_of(case)
    api.export(model, tmp_path / "aqlm", format="aqlm", dtype=None)   # floats as held (float32)
    back, _ = get_importer("aqlm")(tmp_path / "aqlm")
    ours, theirs = aqlm_modules(model), aqlm_modules(back)
    assert ours.keys() == theirs.keys() and len(ours) == (12 if case.startswith("opt") else 14)
    for name, m in ours.items():
        b = theirs[name]
        assert b.codes.dtype == m.codes.dtype and torch.equal(b.codes, m.codes), name
        assert torch.equal(b.codebooks, m.codebooks) and torch.equal(b.scales, m.scales), name
        assert (m.bias is None) == (b.bias is None) and (m.bias is None or torch.equal(m.bias, b.bias)), name
    assert torch.equal(logits(back), logits(model))
    again, _ = api.load_model(tmp_path / "aqlm")      # a folder with quant_method "aqlm" loads directly
    assert torch.equal(logits(again), logits(model))


def test_the_default_fp16_export_is_exact_for_fp16_floats(tmp_path):
    model = quantised("llama", fp16_floats=True)
    api.export(model, tmp_path / "aqlm", format="aqlm")
    stored = load_file(str(tmp_path / "aqlm" / "model.safetensors"))
    assert stored["model.embed_tokens.weight"].dtype == np.float16 and stored["lm_head.weight"].dtype == np.float16
    assert json.loads((tmp_path / "aqlm" / "config.json").read_text())["dtype"] == "float16"
    back, _ = get_importer("aqlm")(tmp_path / "aqlm")
    assert torch.equal(logits(back), logits(model))


def test_export_is_deterministic(model_of, tmp_path):
    model = model_of("llama-2x8")
    for d in "ab":
        api.export(model, tmp_path / d, format="aqlm")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------------
# 2. The stored tensors, read independently

def decode_formats_md(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """formats.md §10, element by element: W[o, 8g + j] = scales[o] * sum_c codebooks[c, codes[o,g,c] mod 2^B,
    0, j], the codebook sum accumulated in float32 in codebook order (as lowbit and aqlm's embedding_bag do)."""
    n_out, n_groups, m = codes.shape
    idx = codes.astype(np.int64) % (1 << bits)
    w = np.zeros((n_out, n_groups, 8), dtype=np.float32)
    for c in range(m):
        w = w + codebooks[c, idx[:, :, c], 0, :].astype(np.float32)
    return (w * scales.reshape(n_out, 1, 1).astype(np.float32)).reshape(n_out, n_groups * 8)


@pytest.mark.parametrize("case, m, bits", [("llama-2x8", 2, 8), ("opt-2x8-bias", 2, 8), ("llama-1x16", 1, 16),
                                           ("llama-2x16", 2, 16)])
def test_stored_tensors_decode_to_lowbits_weights(model_of, case, m, bits, tmp_path):
    model = model_of(case)
    api.export(model, tmp_path / "aqlm", format="aqlm")
    qc = json.loads((tmp_path / "aqlm" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "aqlm", "nbits_per_codebook": bits, "num_codebooks": m, "out_group_size": 1,
                  "in_group_size": 8, "linear_weights_not_to_quantize": ["lm_head", "lm_head.weight"]}
    stored = load_file(str(tmp_path / "aqlm" / "model.safetensors"))
    held = aqlm_modules(model)
    # the file spends exactly the bits lowbit counts for these weights (codes, fp16 codebooks and scales)
    assert sum(stored[f"{n}.{k}"].nbytes for n in held for k in ("codes", "codebooks", "scales")) * 8 == \
        sum(mod.quantized().storage_bits for mod in held.values())
    for name, mod in held.items():
        codes, books, scales = (stored[f"{name}.{k}"] for k in ("codes", "codebooks", "scales"))
        n_out, n_in = mod.out_features, mod.in_features
        assert codes.dtype == (np.int8 if bits == 8 else np.int16) and codes.shape == (n_out, n_in // 8, m)
        assert books.dtype == np.float16 and books.shape == (m, 1 << bits, 1, 8)
        assert scales.dtype == np.float16 and scales.shape == (n_out, 1, 1, 1)
        # the same bits as lowbit's codes (uint8 / int16), read as unsigned codes
        assert np.array_equal(codes.astype(np.int64) % (1 << bits), mod.codes.numpy().astype(np.int64) % (1 << bits))
        w = decode_formats_md(codes, books, scales, bits)
        assert np.array_equal(w, mod.dequantized_weight().numpy()), name
        if mod.bias is not None:
            assert np.array_equal(stored[f"{name}.bias"], mod.bias.detach().half().numpy())
    if case.startswith("llama-1x16"):   # the random codes reach the top half, stored negative
        assert (stored["model.layers.0.mlp.up_proj.codes"] < 0).any()


def test_codes_by_hand(tmp_path):
    """Code 200 of a 2^8-entry codebook is stored as int8 -56, code 40000 of a 2^16-entry one as int16
    -25536 (aqlm's pack_int_data: value - 2^B from 2^(B-1) on)."""
    from lowbit.io.aqlm import aqlm_tensors, codes_from_aqlm

    for bits, code, stored in ((8, 200, -56), (16, 40000, -25536)):
        held = torch.tensor(code if bits == 8 else code - (1 << 16)).to(torch.uint8 if bits == 8 else torch.int16)
        q = AQLMWeight(held.reshape(1, 1, 1), torch.zeros(1, 1 << bits, 8, dtype=torch.float16),
                       torch.ones(1, dtype=torch.float16))
        t = aqlm_tensors("x", q)["x.codes"]
        assert t.dtype == (torch.int8 if bits == 8 else torch.int16) and int(t) == stored
        assert torch.equal(codes_from_aqlm(t, bits, "x"), q.codes)


def test_float_linears_are_listed_in_both_spellings(tmp_path):
    model = quantised("llama", Recipe("aqlm-r0", skip=DEFAULT_SKIP + ("*.mlp.down_proj",)))
    api.export(model, tmp_path / "aqlm", format="aqlm", dtype=None)
    kept = json.loads((tmp_path / "aqlm" / "config.json").read_text())["quantization_config"][
        "linear_weights_not_to_quantize"]
    assert kept == sorted(x for n in ("lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
                          for x in (n, f"{n}.weight"))
    back, _ = get_importer("aqlm")(tmp_path / "aqlm")
    assert type(back.model.layers[1].mlp.down_proj) is torch.nn.Linear and len(aqlm_modules(back)) == 12
    assert torch.equal(logits(back), logits(model))


# ---------------------------------------------------------------------------------------------------
# 3. The aqlm package and transformers

@pytest.mark.interop
@pytest.mark.parametrize("case, bits", [("llama-2x8", 8), ("opt-2x8-bias", 8), ("llama-1x16", 16),
                                        ("llama-2x16", 16)])
def test_the_aqlm_package_decodes_the_stored_tensors_to_lowbits_weights(model_of, case, bits, tmp_path):
    pytest.importorskip("aqlm")
    from aqlm.utils import _dequantize_weight, unpack_int_data

    model = model_of(case)
    api.export(model, tmp_path / "aqlm", format="aqlm")
    stored = load_torch(str(tmp_path / "aqlm" / "model.safetensors"))
    for name, mod in aqlm_modules(model).items():
        codes, books, scales = (stored[f"{name}.{k}"] for k in ("codes", "codebooks", "scales"))
        # float32, as a CPU model is loaded (the numba kernel asserts it)
        w = _dequantize_weight(unpack_int_data(codes, bits), books.float(), scales.float())
        assert torch.equal(w, mod.dequantized_weight()), name


# float32 logits of magnitude ~0.6: aqlm's 2x8 CPU kernel sums x·codeword products per group (a lookup table)
# and scales the row last, lowbit decodes the weight then multiplies; the orders differ by float32 rounding
# (observed 2e-7 through the two layers), so 1e-5 leaves 50x margin while any wrong code or scale moves the
# logits by 1e-2 or more. The 1x16 path (dequantise, then F.linear) is the same arithmetic as lowbit's.
LOGIT_ATOL = 1e-5


@pytest.mark.interop
@pytest.mark.parametrize("case", ["llama-2x8", "opt-2x8-bias", "llama-1x16", "qwen2-1x16-bias", "skip-down"])
def test_transformers_with_aqlm_gives_lowbits_logits(model_of, case, tmp_path):
    pytest.importorskip("aqlm")
    from aqlm import QuantizedLinear
    from transformers import AutoModelForCausalLM

    from lowbit.io.verify import serial_numba

    model = quantised("llama", Recipe("aqlm-r0", skip=DEFAULT_SKIP + ("*.mlp.down_proj",))) \
        if case == "skip-down" else model_of(case)
    api.export(model, tmp_path / "aqlm", format="aqlm", dtype=None)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "aqlm", dtype=torch.float32).eval()
    for name, m in theirs.named_modules():
        if isinstance(m, (torch.nn.Linear, QuantizedLinear)):
            assert isinstance(m, QuantizedLinear) == (name in aqlm_modules(model)), name
    short = IDS[:1, :3]                                         # aqlm's GEMV rule (<= 6 rows); GEMM otherwise
    want = [logits(model), logits(model, short)]
    with serial_numba():      # aqlm 1.1.7's numba kernel races on more than one thread (lowbit/io/verify.py)
        got = [logits(theirs), logits(theirs, short)]
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    print(f"{case}: max |logit difference| transformers+aqlm vs lowbit {diff:.2e} (max |logit| "
          f"{float(want[0].abs().max()):.3f})")
    assert diff <= LOGIT_ATOL
    if "1x16" in case:
        assert diff == 0.0


@pytest.mark.interop
def test_a_quantised_tied_head_loads_untied(tmp_path):
    """A tied model whose output head is quantised: the folder's head is its own codes, so the config says
    untied (transformers would look for a float weight on aqlm's QuantizedLinear and fail)."""
    pytest.importorskip("aqlm")
    import transformers as t

    from tests.conftest import tiny_config

    config = tiny_config("qwen2")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = api.quantize(t.AutoModelForCausalLM.from_config(config).eval(), Recipe("aqlm-r0", skip=()),
                         calibration=CALIB, progress=False)
    api.export(model, tmp_path / "aqlm", format="aqlm", dtype=None)
    assert json.loads((tmp_path / "aqlm" / "config.json").read_text())["tie_word_embeddings"] is False
    theirs = t.AutoModelForCausalLM.from_pretrained(tmp_path / "aqlm", dtype=torch.float32).eval()
    from lowbit.io.verify import serial_numba

    with serial_numba():
        torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=LOGIT_ATOL)
    assert torch.equal(logits(get_importer("aqlm")(tmp_path / "aqlm")[0]), logits(model))


@pytest.mark.interop
def test_export_verify_runs_transformers_with_aqlm(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("aqlm")
    src = tiny_model_dir("llama")
    assert main([str(x) for x in ("quantize", src, "--method", FAST_2X8, "--samples", 4, "--seq-len", 32,
                                  "--quiet", "-o", tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main([str(x) for x in ("export", tmp_path / "q", "--format", "aqlm", "--verify", "--quiet",
                                  "-o", tmp_path / "aqlm")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("verify: transformers loads") and "agrees with lowbit's model on 100.0%" in line


# ---------------------------------------------------------------------------------------------------
# 4. What the layout cannot hold, and folders that are not what they claim

@pytest.mark.parametrize("recipe, words", [
    ("rtn-int4-g32", ["cannot be stored exactly in aqlm", "AQLM codebook weights only"]),
    (Recipe("aqlm-r0", overrides=[("*.mlp.down_proj", "rtn-int4-g32")]), ["mlp.down_proj", "cannot be stored"]),
    (Recipe("aqlm-r0", overrides=[("*.mlp.down_proj", "aqlm-1x8-r0")]),
     ["one codebook shape per model", "mlp.down_proj has 1x8 codebooks", "most layers 2x8"])])
def test_what_aqlm_cannot_hold_is_refused_in_one_line(recipe, words, tmp_path):
    with pytest.raises(LowbitError) as e:
        api.export(quantised("llama", recipe), tmp_path / "x", format="aqlm")
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_other_refusals(tmp_path):
    with pytest.raises(LowbitError, match="no AQLM-quantised Linear"):
        api.export(build_tiny_model("llama"), tmp_path / "a", format="aqlm")
    with pytest.raises(LowbitError, match="Conv1D"):
        api.export(quantised("gpt2", Recipe("aqlm-r0", skip=DEFAULT_SKIP + ("*.attn.c_proj",))), tmp_path / "b",
                   format="aqlm")
    with pytest.raises(LowbitError, match="dtype must be one of"):
        api.export(random_aqlm("llama", 1, 8), tmp_path / "c", format="aqlm", dtype="fp8")
    assert list(tmp_path.iterdir()) == []
    # a weight the layout would round: codebooks that are not fp16 values
    q = AQLMWeight(torch.zeros(4, 2, 1, dtype=torch.uint8), torch.full((1, 256, 8), 0.1), torch.ones(4))
    assert "fp16" in aqlm_problem(q)


def test_quip_weights_tuned_or_not_are_refused(tmp_path):
    """QuIP#'s lattice codes of a rotated weight (with its fine-tuned real-valued signs, too) are no AQLM
    codebooks: the layer is named, nothing is rounded, nothing written."""
    from dataclasses import replace

    from lowbit.methods.quip import QuIP, quip_quantize
    from lowbit.nn.registry import module_for

    model = random_aqlm("llama", 2, 8)
    quip = quip_quantize(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), torch.eye(64), QuIP())
    for w in (quip, replace(quip, su=quip.su.half(), sv=quip.sv.half(), real_signs=True)):
        set_module(model, Q, module_for(w))
        with pytest.raises(LowbitError) as e:
            api.export(model, tmp_path / "x", format="aqlm")
        assert "\n" not in str(e.value) and Q in str(e.value) and "QuIP#" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def good_folder(model_of, tmp_path):
    out = tmp_path / "good"
    api.export(model_of("llama-2x8"), out, format="aqlm", dtype=None)
    return out


def with_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def with_tensor(folder, name, value=None):
    tensors = load_torch(str(folder / "model.safetensors"))
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj"
HOSTILE = {
    "codebook count": (lambda f: with_config(f, num_codebooks=1), "codes are [64, 8, 2]"),
    "codebook size": (lambda f: with_config(f, nbits_per_codebook=16), "codebooks are [2, 256, 1, 8]"),
    "group size": (lambda f: with_config(f, in_group_size=16), "groups of 8 inputs"),
    "bits not 8 or 16": (lambda f: with_config(f, nbits_per_codebook=12), "2^8 or 2^16"),
    "not an integer": (lambda f: with_config(f, num_codebooks="2"), "positive integers"),
    "bad pattern": (lambda f: with_config(f, linear_weights_not_to_quantize=["(lm_head"]), "invalid pattern"),
    "listed but coded": (lambda f: with_config(f, linear_weights_not_to_quantize=[Q]), "keeps it in float"),
    "codes out of range": (lambda f: with_tensor(f, f"{Q}.codes", torch.full((64, 8, 2), 300, dtype=torch.int16)),
                           "out of range for 256-entry"),
    "float codes": (lambda f: with_tensor(f, f"{Q}.codes", torch.zeros(64, 8, 2)), "not integers"),
    "NaN codebook": (lambda f: with_tensor(f, f"{Q}.codebooks", torch.full((2, 256, 1, 8), float("nan"),
                                                                           dtype=torch.float16)), "NaN"),
    "scales shape": (lambda f: with_tensor(f, f"{Q}.scales", torch.ones(64, dtype=torch.float16)), "scales are [64]"),
    "missing scales": (lambda f: with_tensor(f, f"{Q}.scales"), "lacks its scales"),
    "stray bias": (lambda f: with_tensor(f, f"{Q}.bias", torch.zeros(64, dtype=torch.float16)), "holds a bias"),
    "truncated file": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
                       "not a valid safetensors file"),
    "not aqlm": (lambda f: with_config(f, quant_method="gptq"), "not an AQLM checkpoint"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_bad_folders_are_refused_in_one_line(model_of, case, tmp_path, capsys):
    folder = good_folder(model_of, tmp_path)
    spoil, words = HOSTILE[case]
    spoil(folder)
    capsys.readouterr()
    rc = main(["import", str(folder), "--format", "aqlm", "--quiet", "-o", str(tmp_path / "back")])
    err = capsys.readouterr().err
    assert rc != 0 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "back").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["good"]


def test_a_folder_copied_whole_still_imports(model_of, tmp_path):
    """The spoilers above change one thing each: the unspoilt copy imports (so each refusal is that change's)."""
    folder = good_folder(model_of, tmp_path)
    shutil.copytree(folder, tmp_path / "copy")
    assert torch.equal(logits(get_importer("aqlm")(tmp_path / "copy")[0]), logits(model_of("llama-2x8")))
    assert get_exporter("aqlm").requantize_with is None
