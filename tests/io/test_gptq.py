"""The HF GPTQ layout: a decoder written here from the documented packing (../shared/formats.md §4)
reads what we write, transformers' GPTQConfig reads our config, and import gives back every bit."""
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy

from lowbit.core import QuantizedTensor, QuantSpec
from lowbit.errors import LowbitError
from lowbit.io import get_exporter, get_importer
from lowbit.io.gptq import export_gptq, gptq_tensors, import_gptq, pack_int32, quantized_from_gptq, read_gptq, unpack_int32
from lowbit.methods import RTN
from lowbit.methods.gptq import GPTQ, gptq_quantize
from lowbit.nn import QuantLinear


# ---------------------------------------------------------------------------------------------------
# An independent reading of the documented layout (numpy, uint32 words)

def decode_words_along_rows(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """int32 [rows*bits/32, cols] -> codes [rows, cols], as formats.md §4.2 describes the packing."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    out = np.zeros((rows, w.shape[1]), dtype=np.int64)
    if bits in (2, 4, 8):
        per = 32 // bits
        for r in range(rows):
            out[r] = (w[r // per] >> (bits * (r % per))) & ((1 << bits) - 1)
        return out
    assert bits == 3
    for blk in range(rows // 32):
        w0, w1, w2 = w[3 * blk], w[3 * blk + 1], w[3 * blk + 2]
        v = out[32 * blk: 32 * blk + 32]
        for i in range(10):                                   # word 0: values 0-9 at bits 3i
            v[i] = (w0 >> (3 * i)) & 7
        v[10] = ((w0 >> 30) & 3) | ((w1 & 1) << 2)           # low 2 bits in word 0, bit 2 in word 1
        for i in range(11, 21):                               # word 1: values 11-20 from bit 1
            v[i] = (w1 >> (3 * (i - 11) + 1)) & 7
        v[21] = ((w1 >> 31) & 1) | ((w2 & 3) << 1)           # bit 0 in word 1, bits 1-2 in word 2
        for i in range(22, 32):                               # word 2: values 22-31 from bit 2
            v[i] = (w2 >> (3 * (i - 22) + 2)) & 7
    return out


def dequantize_gptq_file(t: dict, prefix: str, bits: int, n_in: int, v1: bool = True) -> np.ndarray:
    """W [out, in] = scales[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k]; v1 zeros are stored minus one."""
    q = decode_words_along_rows(t[f"{prefix}.qweight"], bits, n_in)                      # [K, N]
    scales = t[f"{prefix}.scales"].astype(np.float32)                                    # [G, N]
    zeros = decode_words_along_rows(t[f"{prefix}.qzeros"].T, bits, scales.shape[1]).T   # [G, N]
    zeros = zeros + 1 if v1 else zeros
    g = t[f"{prefix}.g_idx"].astype(np.int64)
    w = scales[g] * (q - zeros[g]).astype(np.float32)
    return w.T


# ---------------------------------------------------------------------------------------------------

def problem(out=64, n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, n, generator=gen) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n ** 0.5)
    return torch.randn(out, n, generator=gen) * 0.05, 2 / 1024 * X.T @ X


SCHEMES = {
    "int4-g128": GPTQ(),                                   # act-order, static groups: no g_idx needed
    "int4-g128-noactorder-dynamic": GPTQ(act_order=False, static_groups=False),
    "int4-g64-dynamic": GPTQ(group_size=64, static_groups=False),   # act-order groups: a g_idx
    "int4-g128-asym": GPTQ(symmetric=False),
    "int3-g128": GPTQ(bits=3),
    "int3-g64-asym-dynamic": GPTQ(bits=3, group_size=64, symmetric=False, static_groups=False),
    "int2-g32": GPTQ(bits=2, group_size=32),
    "int8-channel": GPTQ(bits=8, group_size=None),
    "rtn-int4-g128-asym": RTN(bits=4, group_size=128, symmetric=False),
}


@pytest.mark.parametrize("name", SCHEMES)
def test_independent_decoder_reads_our_export(name, tmp_path):
    W, H = problem()
    cfg = SCHEMES[name]
    qt = gptq_quantize(W, H, cfg) if isinstance(cfg, GPTQ) else cfg.quantize_weight(W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # asymmetric weights may need gptq_v2 (tested below)
        path = export_gptq({"layer": qt}, tmp_path / "out")
    qc = json.loads((path / "quantize_config.json").read_text())
    t = load_numpy(str(path / "model.safetensors"))
    assert t["layer.qweight"].dtype == np.int32 and t["layer.qweight"].shape == (256 * cfg.bits // 32, 64)
    assert t["layer.qzeros"].shape == (qt.scale.shape[1], 64 * cfg.bits // 32)
    assert t["layer.scales"].dtype == np.float16 and t["layer.g_idx"].dtype == np.int32
    decoded = dequantize_gptq_file(t, "layer", cfg.bits, 256, v1=qc["checkpoint_format"] == "gptq")
    assert np.array_equal(decoded, qt.dequantize().numpy())
    assert qc["bits"] == cfg.bits and qc["sym"] == cfg.symmetric and qc["quant_method"] == "gptq"
    assert qc["desc_act"] == (qt.g_idx is not None)
    assert qc["group_size"] == (cfg.group_size or -1)


@pytest.mark.parametrize("name", SCHEMES)
def test_round_trip_is_bit_identical(name):
    W, H = problem(seed=1)
    cfg = SCHEMES[name]
    qt = gptq_quantize(W, H, cfg) if isinstance(cfg, GPTQ) else cfg.quantize_weight(W)
    fmt = "gptq_v2" if (qt.zero - qt.spec.number_format.qmin < 1).any() else "gptq"
    back = quantized_from_gptq(gptq_tensors("m", qt, fmt), "m", qt.spec, 256, fmt)
    assert torch.equal(back.codes, qt.codes) and back.codes.dtype == qt.codes.dtype
    assert torch.equal(back.scale, qt.scale) and torch.equal(back.zero, qt.zero)
    assert (back.g_idx is None) == (qt.g_idx is None)
    if qt.g_idx is not None:
        assert torch.equal(back.g_idx, qt.g_idx)
    assert back.spec == qt.spec


def test_symmetric_zeros_are_the_documented_constant():
    W, H = problem()
    t = gptq_tensors("m", gptq_quantize(W, H, GPTQ()))
    assert (t["m.qzeros"] == 0x77777777).all()       # zero 8, stored as 7 in every nibble (v1)
    t3 = gptq_tensors("m", gptq_quantize(W, H, GPTQ(bits=3)))
    zeros = decode_words_along_rows(t3["m.qzeros"].numpy().T, 3, 64)
    assert (zeros == 3).all()                         # 3-bit: zero 4, stored as 3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_int32_matches_the_documented_layout(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (96, 40), generator=gen)
    words = pack_int32(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (96 * bits // 32, 40)
    assert np.array_equal(decode_words_along_rows(words.numpy(), bits, 96), codes.numpy())
    assert torch.equal(unpack_int32(words, bits, 96).long(), codes)


def test_zero_point_of_zero_needs_v2(tmp_path):
    codes = torch.randint(0, 16, (32, 128), dtype=torch.uint8)
    scale = torch.full((32, 1), 0.0078125)
    zero = torch.full((32, 1), 5.0)
    zero[3] = 0.0
    qt = QuantizedTensor(codes, scale, zero, QuantSpec("uint4", "group", 128, False), torch.float32)
    with pytest.raises(LowbitError, match="gptq_v2"):
        gptq_tensors("m", qt, "gptq")
    with pytest.warns(UserWarning, match="gptq_v2"):
        path = export_gptq({"m": qt}, tmp_path / "v2")
    assert json.loads((path / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    t = load_numpy(str(path / "model.safetensors"))
    assert np.array_equal(dequantize_gptq_file(t, "m", 4, 128, v1=False), qt.dequantize().numpy())
    back = read_gptq(path)[0]["m"]
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.zero, qt.zero)


def test_export_refuses_what_the_layout_cannot_hold(tmp_path):
    W, H = problem()
    with pytest.raises(LowbitError, match="one scheme per model"):
        export_gptq({"a": gptq_quantize(W, H, GPTQ()), "b": gptq_quantize(W, H, GPTQ(bits=3))}, tmp_path / "a")
    with pytest.raises(LowbitError, match="fp16 scales"):
        export_gptq({"a": RTN(bits=4, group_size=128, scale_dtype="bf16").quantize_weight(W * 1e-4)}, tmp_path / "b")
    with pytest.raises(LowbitError, match="2, 3, 4 or 8-bit"):
        export_gptq({"a": RTN(bits=5, group_size=128).quantize_weight(W)}, tmp_path / "c")
    with pytest.raises(LowbitError, match="nothing to export"):
        export_gptq(torch.nn.Linear(4, 4), tmp_path / "d")
    assert not any(tmp_path.iterdir())   # nothing half-written


def test_registered():
    assert get_exporter("gptq").name == "gptq" and get_importer("gptq") is import_gptq


# ---------------------------------------------------------------------------------------------------
# A whole model

def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()


@pytest.fixture(scope="module")
def quantized_model():
    import lowbit.api as api

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # thousands of small ops: waiting threads on a shared machine cost more
    model = tiny_llama()
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    api.quantize(model, GPTQ(group_size=64, static_groups=False), calibration=ids, progress=False)
    torch.set_num_threads(threads)
    return model


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_model_round_trip(quantized_model, tmp_path, dtype):
    from transformers import GPTQConfig

    path = export_gptq(quantized_model, tmp_path / "tiny-gptq", dtype=dtype)
    cfg = json.loads((path / "config.json").read_text())
    parsed = GPTQConfig.from_dict(cfg["quantization_config"])   # what transformers reads
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym) == (4, 64, True, True)
    model, _ = import_gptq(path)
    ours = {n: m for n, m in quantized_model.named_modules() if isinstance(m, QuantLinear)}
    back = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == back.keys() and len(ours) == 14
    for name, m in ours.items():
        for buf in ("qweight", "scales", "g_idx"):
            assert torch.equal(getattr(back[name], buf), getattr(m, buf)), (name, buf)
        assert back[name].spec == m.spec
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = quantized_model(ids).logits, model(ids).logits
    if dtype is None:
        assert torch.equal(a, b)
    else:   # embeddings and norms went through fp16
        assert torch.allclose(a, b, atol=1e-2)
    qts, _, qc = read_gptq(path)
    assert qc["desc_act"] and set(qts) == set(ours)
