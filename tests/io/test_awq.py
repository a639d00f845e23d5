"""AWQ GEMM export and import, checked with an independent decoder of the layout in shared/formats.md §5."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.io import get_exporter, get_importer
from lowbit.io.awq import pack_awq, unpack_awq
from lowbit.methods import RTN
from lowbit.methods.awq import AWQ
from lowbit.nn import QuantLinear
from tests.conftest import build_tiny_model

GEN = torch.Generator().manual_seed(0)
CALIB = torch.randint(0, 512, (4, 48), generator=GEN)
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def decode_words(words: np.ndarray) -> np.ndarray:
    """Independent reading of the layout, one word at a time: nibble i of word c is column 8c + ORDER[i]."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    rows, n_words = u.shape
    out = np.zeros((rows, 8 * n_words), dtype=np.int64)
    for r in range(rows):
        for c in range(n_words):
            word = int(u[r, c])
            for i in range(8):
                out[r, 8 * c + ORDER[i]] = (word >> (4 * i)) & 0xF
    return out


def test_one_word_by_hand():
    # columns 0..7 hold 1..8; nibbles from low to high hold columns 0,2,4,6,1,3,5,7 -> 1,3,5,7,2,4,6,8
    word = int(pack_awq(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))[0, 0])
    assert word & 0xFFFFFFFF == 0x86427531


def test_pack_unpack_round_trip_and_independent_decoder():
    v = torch.randint(0, 16, (5, 32), generator=GEN)
    words = pack_awq(v)
    assert words.dtype == torch.int32 and words.shape == (5, 4)
    assert torch.equal(unpack_awq(words), v)
    assert np.array_equal(decode_words(words.numpy()), v.numpy())
    with pytest.raises(LowbitError):
        pack_awq(torch.full((1, 8), 16))
    with pytest.raises(LowbitError):
        pack_awq(torch.zeros(1, 12, dtype=torch.int64))


def quantised_tiny(config):
    model = build_tiny_model("llama")
    return api.quantize(model, config, calibration=CALIB, progress=False)


AWQ_TINY = AWQ(group_size=32, n_grid=4, objective="layer")   # the layout is under test, not the search


@pytest.fixture(scope="module")
def awq_model():
    return quantised_tiny(AWQ_TINY)


@pytest.mark.parametrize("which", ["awq-uint4", "rtn-int4-sym"])
def test_export_decodes_to_the_quantised_weights(which, awq_model, tmp_path):
    model = awq_model if which == "awq-uint4" else quantised_tiny(RTN(bits=4, group_size=32, symmetric=True))
    get_exporter("awq")(model, tmp_path / "awq")
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4,
                                          "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    tensors = load_file(str(tmp_path / "awq" / "model.safetensors"))
    n_checked = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
        k, n = m.in_features, m.out_features
        assert qweight.dtype == np.int32 and qweight.shape == (k, n // 8)
        assert qzeros.shape == (k // 32, n // 8) and scales.dtype == np.float16 and scales.shape == (k // 32, n)
        q = decode_words(qweight)                      # [K, N]
        z = decode_words(qzeros)                       # [G, N]
        groups = np.arange(k) // 32
        w = (q - z[groups]).astype(np.float64) * scales[groups].astype(np.float64)
        assert np.array_equal(w.T.astype(np.float32), m.dequantized_weight().numpy())
        n_checked += 1
    assert n_checked == 14
    assert "lm_head.weight" in tensors and tensors["model.embed_tokens.weight"].dtype == np.float16


def test_import_gives_back_the_same_quantised_model(awq_model, tmp_path, tiny_tokenizer):
    model = awq_model
    get_exporter("awq")(model, tmp_path / "awq", tokenizer=tiny_tokenizer)
    loaded, tok = get_importer("awq")(tmp_path / "awq")
    assert tok is not None
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m2 = loaded.get_submodule(name)
            assert isinstance(m2, QuantLinear) and torch.equal(m2.dequantized_weight(), m.dequantized_weight())
    ids = torch.randint(0, 512, (2, 24), generator=GEN)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    # only the unquantised tensors (embeddings, norms, head) went through fp16
    assert float((a - b).abs().max() / a.abs().max()) < 2e-3


def test_what_awq_cannot_hold_is_refused(tmp_path):
    with pytest.raises(LowbitError, match="4-bit"):
        get_exporter("awq")(quantised_tiny(AWQ(bits=3, group_size=32, n_grid=1, objective="layer")), tmp_path / "a")
    with pytest.raises(LowbitError, match="group"):
        get_exporter("awq")(quantised_tiny(RTN(bits=4, group_size=None)), tmp_path / "b")
    with pytest.raises(LowbitError, match="no quantised"):
        get_exporter("awq")(build_tiny_model("llama"), tmp_path / "c")
    assert not (tmp_path / "a").exists()


def test_import_refuses_other_checkpoints(tmp_path):
    build_tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(LowbitError, match="not an AWQ"):
        get_importer("awq")(tmp_path / "plain")
