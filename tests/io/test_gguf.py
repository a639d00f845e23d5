"""GGUF writer and reader: gguf-py reads back exactly our values, the q/k permutation is
convert_hf_to_gguf's, round trips are exact, and damaged files fail cleanly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from lowbit.errors import LowbitError
from lowbit.io import get_exporter, get_importer
from lowbit.io.gguf import EXPORTER, export_gguf, gguf_names
from lowbit.io.gguf_read import load_gguf
from lowbit.kernels import native
from lowbit.kernels.ggml_search import searches
from lowbit.methods.ggml_mix import tensor_type
from lowbit.weights.ggml import dequantize_ggml, quantize_ggml
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama whose rows suit the k-quants (hidden 256), with GQA and an untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def convert_hf_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, written from its description in formats.md."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def fields(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def hf_weight(model, gguf: str) -> torch.Tensor:
    hf = {g: h for h, g in gguf_names(model).items()}[gguf]
    w = model.get_submodule(hf).weight.detach().float()
    if ".attn_q." in gguf:
        return convert_hf_permute(w, model.config.num_attention_heads)
    if ".attn_k." in gguf:
        return convert_hf_permute(w, model.config.num_key_value_heads)
    return w


@pytest.fixture(scope="module")
def q4_k_m_file(llama, tiny_tokenizer, tmp_path_factory):
    return export_gguf(llama, tmp_path_factory.mktemp("gguf") / "tiny-q4_k_m.gguf", type="Q4_K_M",
                       tokenizer=tiny_tokenizer, search=False)


def test_gguf_reader_returns_our_values_for_every_tensor(llama, q4_k_m_file):
    reader = GGUFReader(q4_k_m_file)
    seen = {}
    for t in reader.tensors:
        kind = GGMLQuantizationType(t.tensor_type).name
        seen[t.name] = kind
        w = hf_weight(llama, t.name)
        if w.dim() == 1:
            assert kind == "F32" and torch.equal(torch.from_numpy(np.array(t.data)), w)
            continue
        theirs = torch.from_numpy(quants.dequantize(np.array(t.data), GGMLQuantizationType[kind]))
        with searches():   # what the exporter runs when the compiled kernels load
            ours = dequantize_ggml(quantize_ggml(w, kind, search=False), kind)
        assert kind == tensor_type("q4_k_m", t.name, 2, w.shape[1], n_gqa=2)
        assert torch.equal(theirs, ours), t.name
    assert len(seen) == 2 + 2 * 9 + 1
    assert seen["output.weight"] == "Q6_K" and seen["blk.1.attn_v.weight"] == "Q6_K"
    assert seen["blk.0.attn_q.weight"] == "Q4_K" and seen["token_embd.weight"] == "Q4_K"


def test_metadata_is_what_llama_cpp_reads(llama, q4_k_m_file, tiny_tokenizer):
    meta = fields(GGUFReader(q4_k_m_file))
    assert meta["general.architecture"] == "llama" and meta["GGUF.version"] == 3
    sizes = meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]
    assert sizes == (2, 256, 512)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.rope.dimension_count"] == 64 and meta["llama.rope.freq_base"] == 10000.0
    assert meta["general.file_type"] == 15 and meta["general.quantization_version"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tiny_tokenizer.get_vocab()
    assert [vocab[t] for t in meta["tokenizer.ggml.tokens"]] == list(range(512))
    eot = vocab["<|endoftext|>"]
    assert meta["tokenizer.ggml.token_type"][eot] == 3 and meta["tokenizer.ggml.bos_token_id"] == eot
    assert len(meta["tokenizer.ggml.merges"]) == 512 - 1 - 256   # each BPE merge made one of the tokens


def test_f32_file_holds_convert_hf_permuted_weights(llama, tiny_tokenizer, tmp_path):
    path = export_gguf(llama, tmp_path / "f32.gguf", type="F32", tokenizer=tiny_tokenizer)
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFReader(path).tensors}
    q = llama.model.layers[1].self_attn.q_proj.weight.detach()
    k = llama.model.layers[1].self_attn.k_proj.weight.detach()
    assert torch.equal(tensors["blk.1.attn_q.weight"], convert_hf_permute(q, 4))
    assert torch.equal(tensors["blk.1.attn_k.weight"], convert_hf_permute(k, 2))
    assert torch.equal(tensors["blk.1.attn_v.weight"], llama.model.layers[1].self_attn.v_proj.weight.detach())


def test_loaded_model_is_the_dequantised_model(llama, q4_k_m_file, tiny_tokenizer, monkeypatch):
    """Exactly, on the Python path (the fused kernels sum in another order: tests/kernels bound them)."""
    w = llama.model.layers[0].self_attn.q_proj.weight.detach()
    with searches():   # as the exporter quantised it
        q_weight = dequantize_ggml(quantize_ggml(w, "Q4_K", search=False), "Q4_K")
    monkeypatch.setitem(native._state, "lib", None)
    monkeypatch.setitem(native._state, "why", "the Python path is the exact reference")
    model, tok = load_gguf(q4_k_m_file)
    reference = type(llama)(llama.config).eval()
    reference.load_state_dict(llama.state_dict())
    for name, module in model.named_modules():
        if hasattr(module, "dequantized_weight"):
            reference.get_submodule(name).weight.data = module.dequantized_weight()
    reference.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.clone()
    text = "The quick brown fox jumps over the lazy dog, twice."
    ids = torch.tensor([tiny_tokenizer(text)["input_ids"]])
    assert tok(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.dequantized_weight(), q_weight)


def test_pipeline_blocks_are_copied_not_requantised(llama, tiny_tokenizer, tmp_path):
    """A model quantised by the pipeline with a file type already holds the bytes the file gets."""
    from lowbit.api import quantize

    model = type(llama)(llama.config).eval()
    model.load_state_dict(llama.state_dict())
    quantize(model, "q3_k_m", progress=False)
    path = export_gguf(model, tmp_path / "piped.gguf", type="Q3_K_M", tokenizer=tiny_tokenizer)
    tensors = {t.name: (GGMLQuantizationType(t.tensor_type).name, np.array(t.data)) for t in GGUFReader(path).tensors}
    held = model.model.layers[0].self_attn.v_proj
    assert held.type == tensors["blk.0.attn_v.weight"][0] == "Q5_K"
    assert np.array_equal(held.blocks.numpy(), tensors["blk.0.attn_v.weight"][1])
    k = model.model.layers[1].self_attn.k_proj
    from lowbit.io.gguf import rope_permutation
    assert np.array_equal(k.blocks[rope_permutation(128, 2)].numpy(), tensors["blk.1.attn_k.weight"][1])


def test_export_is_deterministic_and_atomic(llama, tiny_tokenizer, tmp_path):
    a = export_gguf(llama, tmp_path / "a.gguf", type="Q8_0", tokenizer=tiny_tokenizer)
    b = export_gguf(llama, tmp_path / "b.gguf", type="Q8_0", tokenizer=tiny_tokenizer)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]
    assert get_exporter("gguf") is EXPORTER and get_importer("gguf") is load_gguf


def test_export_refuses_what_llama_cpp_cannot_load(tiny_tokenizer, tmp_path):
    with pytest.raises(LowbitError, match="Llama"):
        export_gguf(build_tiny_model("gpt2"), tmp_path / "x.gguf", type="Q8_0", tokenizer=tiny_tokenizer)
    with pytest.raises(LowbitError, match="file type"):
        export_gguf(build_tiny_model("llama"), tmp_path / "x.gguf", type="Q4_K_X", tokenizer=tiny_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_rows_that_do_not_fit_fall_back(tiny_tokenizer, tmp_path):
    """The conftest Llama has 64-wide rows: Q4_K_M stores them as Q5_0 and the head as Q8_0."""
    path = export_gguf(build_tiny_model("llama"), tmp_path / "small.gguf", type="Q4_K_M", tokenizer=tiny_tokenizer)
    kinds = {t.name: GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(path).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q5_0" and kinds["blk.0.ffn_down.weight"] == "Q5_0"
    assert kinds["token_embd.weight"] == "Q5_0" and kinds["output.weight"] == "Q8_0"
    model, _ = load_gguf(path)
    assert model.model.layers[0].mlp.down_proj.type == "Q5_0"


@pytest.fixture(scope="module")
def small_file(tiny_tokenizer, tmp_path_factory):
    return export_gguf(build_tiny_model("llama"), tmp_path_factory.mktemp("fuzz") / "s.gguf", type="Q8_0",
                       tokenizer=tiny_tokenizer).read_bytes()


def load_or_lowbit_error(data: bytes, path) -> bool:
    path.write_bytes(data)
    try:
        load_gguf(path)
        return True
    except LowbitError as e:
        assert "\n" not in str(e)
        return False


def test_truncated_files_are_clear_errors(small_file, tmp_path):
    cuts = sorted(set(range(0, 4096, 7)) | set(np.linspace(4096, len(small_file) - 1, 60).astype(int)))
    for cut in cuts:
        assert not load_or_lowbit_error(small_file[:cut], tmp_path / "t.gguf"), cut


def test_corrupted_bytes_never_crash(small_file, tmp_path):
    """Random byte flips in the header, metadata and tensor table: a model or a LowbitError, nothing else."""
    rng = np.random.default_rng(0)
    header_end = small_file.index(b"token_embd.weight") + 2000
    for trial in range(150):
        data = bytearray(small_file)
        for pos in rng.integers(0, header_end, size=rng.integers(1, 4)):
            data[pos] = int(rng.integers(0, 256))
        load_or_lowbit_error(bytes(data), tmp_path / "c.gguf")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(100))
    with pytest.raises(LowbitError, match="magic"):
        load_gguf(tmp_path / "x.gguf")
    with pytest.raises(LowbitError, match="no such file"):
        load_gguf(tmp_path / "missing.gguf")
