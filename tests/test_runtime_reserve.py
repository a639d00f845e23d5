"""The runtime reserve's estimates against what the engines themselves hold: transformers' prefill
activations against the CPU allocator's peak in torch's profiler, and llama.cpp's compute and output
buffers against the sizes llama.cpp reports when it reserves them (interop: llama-cpp-python)."""
from __future__ import annotations

import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.calc import ModelShape, kv_cache_memory, llamacpp_compute_buffer, transformers_prefill_activations

MIB = 2**20
BUNDLED = Path(__file__).resolve().parents[1] / "data" / "lowbit-tiny-llama"


def allocator_peak(fn, trace: Path) -> int:
    """The largest number of bytes torch's CPU allocator held while `fn` ran, above what it held before
    (the "Total Allocated" of the profiler's [memory] events, read from its trace written to `trace`)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


@pytest.mark.parametrize("dims,dtype", [((256, 768, 4, 2), torch.float32), ((512, 1024, 8, 8), torch.bfloat16)])
def test_transformers_prefill_activations_are_the_allocator_peak(dims, dtype, one_thread, tmp_path):
    import transformers as t

    hidden, inter, heads, kv_heads = dims
    tokens, layers, vocab = 384, 2, 1024
    config = t.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=vocab,
                           max_position_embeddings=tokens, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = t.LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, vocab, (1, tokens))

    def prefill():     # what generate runs first: the whole prompt, the last position's logits only
        with torch.no_grad():
            prefill.out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)

    peak = allocator_peak(prefill, tmp_path / "trace.json")
    head_dim = hidden // heads
    kv = kv_cache_memory(layers, kv_heads, head_dim, tokens, 1, "fp32" if dtype == torch.float32 else "bf16").bytes
    shape = ModelShape("probe", layers, hidden, inter, heads, kv_heads, head_dim, vocab)
    element = torch.finfo(dtype).bits // 8
    # the logits of one position (vocab x 4 bytes) come after the layers' activations are freed
    assert peak - kv == transformers_prefill_activations(shape, tokens, element)


def write_gguf(path, shape: ModelShape) -> None:
    """A Llama GGUF of `shape` with zero Q8_0 weights: llama.cpp sizes its buffers from the shape alone."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from transformers import AutoTokenizer

    from lowbit.io.gguf import _write_hparams, _write_tokenizer

    config = types.SimpleNamespace(
        vocab_size=shape.vocab, max_position_embeddings=16384, hidden_size=shape.hidden,
        num_hidden_layers=shape.layers, intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    writer = GGUFWriter(str(path), "llama")
    _write_hparams(writer, config, "q8_0", "probe")
    _write_tokenizer(writer, AutoTokenizer.from_pretrained(BUNDLED), shape.vocab, None)

    def add(name, rows, cols):
        writer.add_tensor(name, np.zeros((rows, cols // 32 * 34), np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)

    add("token_embd.weight", shape.vocab, shape.hidden)
    for name, _, block, (rows, cols) in shape.linears():
        add(f"blk.{block}.{ROLES[name.rsplit('.', 1)[-1]]}.weight", rows, cols)
    for block in range(shape.layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", np.ones(shape.hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(shape.hidden, np.float32))
    add("output.weight", shape.vocab, shape.hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def llama_cpp_buffers(path, n_ctx: int, capfd) -> tuple[float, float]:
    """(compute, output) buffer MiB llama.cpp reports for `path` at n_ctx, flash attention on, one sequence."""
    from tests.llamacpp import llama_cpp

    capfd.readouterr()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=1,
                          flash_attn=True, verbose=True)
    del llm
    log = capfd.readouterr().err
    assert "flash_attn = enabled" in re.sub(r" +", " ", log)
    compute = re.findall(r"CPU compute buffer size = +([0-9.]+) MiB", log)
    output = re.findall(r"CPU +output buffer size = +([0-9.]+) MiB", log)
    return float(compute[0]), float(output[0])


@pytest.mark.interop
@pytest.mark.parametrize("dims,exact", [((512, 1376, 8, 8, 16384), True),     # the ubatch's logits dominate
                                        ((2048, 5504, 16, 16, 4096), False)])  # the feed-forward dominates
def test_llamacpp_buffers_are_what_llama_cpp_reserves(dims, exact, tmp_path, capfd):
    hidden, inter, heads, kv_heads, vocab = dims
    shape = ModelShape("probe", 1, hidden, inter, heads, kv_heads, hidden // heads, vocab)
    write_gguf(tmp_path / "probe.gguf", shape)
    for n_ctx in (2048, 4096):
        compute, output = llama_cpp_buffers(tmp_path / "probe.gguf", n_ctx, capfd)
        estimate = llamacpp_compute_buffer(shape, n_ctx) / MIB
        assert output == pytest.approx(4 * vocab / MIB, abs=0.006)          # logged to two decimals
        measured = compute + output
        if exact:
            assert estimate == pytest.approx(measured, abs=0.02)
        else:   # ggml's allocator reuses buffers: the closed form is an upper bound, within a third
            assert measured <= estimate <= 1.34 * measured
