"""llama.cpp itself (llama-cpp-python, built from PyPI by `make test-interop`) against our GGUF files
of the bundled model: it loads them, tokenises like transformers, computes the logits our dequantised
model computes, picks the same per-tensor types, and its own quantiser is no better than ours.

Run: .venv/bin/python -m pytest -m interop -s tests/io/test_gguf_llamacpp.py   (-s prints the numbers)
"""
from __future__ import annotations

import ctypes
import functools
import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from lowbit.errors import LowbitError
from lowbit.io.gguf import export_gguf, gguf_names
from lowbit.io.gguf_read import load_gguf
from lowbit.methods.ggml_mix import FILE_TYPES, tensor_type
from lowbit.weights.ggml import BLOCK_TYPES, quantize_ggml

pytestmark = pytest.mark.interop
from tests.llamacpp import llama_cpp  # noqa: E402  (skips the module when llama-cpp-python is absent)

N_CTX = 256
RESULTS = os.environ.get("LOWBIT_INTEROP_RESULTS")   # optional JSON file collecting the measured numbers


def record(key: str, value) -> None:
    print(f"\n[interop] {key}: {json.dumps(value)}")
    if RESULTS:
        data = json.loads(open(RESULTS).read()) if os.path.exists(RESULTS) else {}
        data[key] = value
        with open(RESULTS, "w") as f:
            json.dump(data, f, indent=1)


@pytest.fixture(autouse=True, scope="module")
def few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundled():
    from lowbit.api import load_model

    try:
        model, tok = load_model(None)
    except LowbitError as e:
        pytest.skip(str(e))
    return model.float().eval(), tok


@pytest.fixture(scope="module")
def held_out(bundled):
    """Four windows of N_CTX tokens of the bundled eval text."""
    from lowbit.data import bundled_text

    _, tok = bundled
    ids = tok(bundled_text("eval")[:100000])["input_ids"]
    return [ids[i * N_CTX:(i + 1) * N_CTX] for i in range(4)]


@pytest.fixture(scope="module")
def exports(bundled, tmp_path_factory):
    model, tok = bundled
    folder = tmp_path_factory.mktemp("llamacpp")
    return functools.cache(lambda ftype: export_gguf(model, folder / f"bundled-{ftype}.gguf", type=ftype, tokenizer=tok))


def llama_cpp_logits(path, windows) -> torch.Tensor:
    # F32 KV cache: the comparison is about the weights, not llama.cpp's default F16 cache.
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    out = []
    try:
        for ids in windows:
            llm.reset()
            llm.eval(ids)
            out.append(torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)))
    finally:
        llm.close()
    return torch.cat(out)


def torch_logits(model, windows) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([ids])).logits[0].float() for ids in windows])


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a - b).abs()
    return {"max_abs_diff": round(float(diff.max()), 5), "mean_abs_diff": round(float(diff.mean()), 5),
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4)}


def test_f32_export_runs_in_llama_cpp_as_in_transformers(bundled, held_out, exports):
    """Unquantised: any difference would be the file (metadata, q/k order, tokenizer ids), not rounding."""
    model, _ = bundled
    stats = agreement(llama_cpp_logits(exports("F32"), held_out), torch_logits(model, held_out))
    record("F32 llama.cpp vs transformers", stats)
    assert stats["max_abs_diff"] < 2e-3 and stats["top1_agreement"] == 1.0


def test_llama_cpp_tokenises_like_transformers(bundled, exports):
    from lowbit.data import bundled_text

    _, tok = bundled
    llm = llama_cpp.Llama(model_path=str(exports("Q8_0")), vocab_only=True, verbose=False)
    text = bundled_text("eval")[:3000]
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"]
    llm.close()


# Every file type lowbit writes. From Q3_K up llama.cpp's next token agrees with our dequantised model
# on >= 95% of the held-out positions; Q2_K (whose activation rounding in llama.cpp is as coarse as its
# weights) is only required to load and to agree better than chance.
FILE_TYPES_WRITTEN = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
                      "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]


@pytest.mark.parametrize("ftype", FILE_TYPES_WRITTEN)
def test_llama_cpp_loads_every_type_and_agrees(bundled, held_out, exports, ftype):
    path = exports(ftype)
    theirs = llama_cpp_logits(path, held_out)
    ours = torch_logits(load_gguf(path)[0], held_out)
    stats = agreement(theirs, ours)
    record(f"{ftype} llama.cpp vs our dequantised model, top-1 ({len(theirs)} positions)", stats)
    assert stats["top1_agreement"] >= (0.5 if ftype == "Q2_K" else 0.95)


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_llama_cpp_logits_agree_with_our_dequantised_model(bundled, held_out, exports, ftype):
    """llama.cpp multiplies quantised weights with activations it rounds to 8 bits (Q8_0 / Q8_K blocks),
    we multiply the same dequantised weights in float32: the logits differ by that rounding only (the
    F32 test above and the block-identity tests below pin everything else). For 4-bit files that is a
    fraction of what the weight quantisation itself moves."""
    model, _ = bundled
    path = exports(ftype)
    theirs = llama_cpp_logits(path, held_out)
    ours = torch_logits(load_gguf(path)[0], held_out)
    stats = agreement(theirs, ours)
    stats["ours_vs_float"] = agreement(ours, torch_logits(model, held_out))
    record(f"{ftype} llama.cpp vs our dequantised model ({len(theirs)} positions)", stats)
    assert stats["top1_agreement"] >= 0.97 and stats["mean_abs_diff"] < 0.05 and stats["max_abs_diff"] < 0.5
    if ftype != "Q8_0":
        assert stats["mean_abs_diff"] < 0.35 * stats["ours_vs_float"]["mean_abs_diff"]


def llama_cpp_quantize(src, dst, ftype: str, pure: bool = False, imatrix: dict | None = None) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[ftype.lower()].file_type
    params.nthread = 2
    params.pure = pure
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entry.name = name.encode()
            entry.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = arr.size
        params.imatrix = entries
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed for {ftype}"


def gguf_tensors(path) -> dict:
    return {t.name: (GGMLQuantizationType(t.tensor_type).name, np.array(t.data)) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("ftype", ["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "q8_0"])
def test_tensor_types_are_llama_quantize_s(bundled, exports, tmp_path, ftype):
    model, _ = bundled
    f32 = exports("F32")
    llama_cpp_quantize(f32, tmp_path / "q.gguf", ftype)
    theirs = {n: kind for n, (kind, _) in gguf_tensors(tmp_path / "q.gguf").items()}
    n_gqa = model.config.num_attention_heads // model.config.num_key_value_heads
    ours = {n: tensor_type(ftype, n, model.config.num_hidden_layers, data.shape[-1], n_gqa)
            for n, (_, data) in gguf_tensors(f32).items()}
    assert ours == theirs


@pytest.fixture(scope="module")
def imatrix(bundled):
    """llama.cpp's importance matrix of the bundled model: mean squared input of every Linear over
    calibration text, keyed by GGUF tensor name."""
    from lowbit.data import bundled_text

    model, tok = bundled
    ids = torch.tensor(tok(bundled_text("calibration")[:200000])["input_ids"][:32 * N_CTX]).reshape(-1, N_CTX)
    sums, counts, hooks = {}, {}, []
    names = gguf_names(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name in names:
            def hook(mod, args, out, key=names[name]):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in ids.split(8):
            model(batch)
    for h in hooks:
        h.remove()
    return {k: (sums[k] / counts[k]).float() for k in sums}


def total_errors(original: dict, quantised: dict, imatrix: dict) -> dict:
    """Plain and activation-weighted squared error summed over every quantised weight matrix
    (token_embd has no activations: it counts in the plain sum only)."""
    plain = weighted = 0.0
    for name, w in original.items():
        if w.ndim != 2:
            continue
        kind, data = quantised[name]
        err = (torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[kind])).double() - w.double()) ** 2
        plain += float(err.sum())
        if name in imatrix:
            weighted += float((err * imatrix[name].double()).sum())
    return {"sse": plain, "act_weighted_sse": weighted}


PURE_FILE_TYPES = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0", "Q2_K": "q2_k",
                   "Q3_K": "q3_k_s", "Q4_K": "q4_k_m", "Q5_K": "q5_k_m", "Q6_K": "q6_k"}


def identical_blocks(ours: dict, theirs: dict, kind: str) -> float:
    size = BLOCK_TYPES[kind].type_size
    same = [(a.reshape(-1, size) == theirs[n][1].reshape(-1, size)).all(1) for n, (_, a) in ours.items()]
    return float(np.concatenate(same).mean())


@pytest.mark.parametrize("kind", list(PURE_FILE_TYPES))
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
def test_search_false_writes_llama_quantize_s_blocks(exports, imatrix, tmp_path, kind, use_imatrix):
    """Without search we reproduce llama-quantize (its `_ref` quantisers, or `_impl` with an imatrix):
    byte for byte for the 32-blocks without imatrix; otherwise up to float summation order (ggml sums
    sequentially, with fused multiply-adds), which flips a near-tie in a few blocks."""
    f32 = exports("F32")
    imat = {k: v.numpy() for k, v in imatrix.items()} if use_imatrix else None
    llama_cpp_quantize(f32, tmp_path / "theirs.gguf", PURE_FILE_TYPES[kind], pure=True, imatrix=imat)
    theirs = gguf_tensors(tmp_path / "theirs.gguf")
    ours = {n: (kind, quantize_ggml(torch.from_numpy(w), kind, None if imat is None else imat.get(n), search=False))
            for n, (_, w) in gguf_tensors(f32).items() if w.ndim == 2}
    same = identical_blocks(ours, theirs, kind)
    record(f"{kind} search=False {'with' if use_imatrix else 'without'} imatrix: share of blocks identical "
           "to llama.cpp's", round(same, 5))
    exact = kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") and not use_imatrix
    assert same == 1.0 if exact else same >= 0.95


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
def test_our_quantiser_is_no_worse_than_llama_cpp(exports, imatrix, tmp_path, kind, use_imatrix):
    """Every matrix of the bundled model quantised to one type (llama-quantize --pure), by llama.cpp and
    by us, with and without the importance matrix: our summed errors are no larger."""
    f32 = exports("F32")
    original = {n: torch.from_numpy(data.copy()) for n, (_, data) in gguf_tensors(f32).items()}
    imat = imatrix if use_imatrix else None
    llama_cpp_quantize(f32, tmp_path / "theirs.gguf", PURE_FILE_TYPES[kind], pure=True,
                       imatrix={k: v.numpy() for k, v in imat.items()} if imat else None)
    theirs = gguf_tensors(tmp_path / "theirs.gguf")
    ours = {n: (kind, quantize_ggml(w, kind, None if imat is None else imat.get(n)))
            for n, w in original.items() if w.ndim == 2}
    replica = {n: (kind, quantize_ggml(w, kind, None if imat is None else imat.get(n), search=False))
               for n, w in original.items() if w.ndim == 2}
    e_theirs, e_ours = total_errors(original, theirs, imatrix), total_errors(original, ours, imatrix)
    record(f"{kind} {'with' if use_imatrix else 'without'} imatrix: llama.cpp vs lowbit", {
        "llama.cpp": e_theirs, "lowbit": e_ours, "sse_ratio": round(e_ours["sse"] / e_theirs["sse"], 4),
        "act_weighted_ratio": round(e_ours["act_weighted_sse"] / e_theirs["act_weighted_sse"], 4),
        "search=False_identical_blocks": round(identical_blocks(replica, theirs, kind), 5)})
    # Each side minimises the error it is given: plain without an imatrix, weighted with one.
    target = "act_weighted_sse" if use_imatrix else "sse"
    assert e_ours[target] <= e_theirs[target]
