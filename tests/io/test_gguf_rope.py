"""GGUF rope scaling: what changes a Llama's arithmetic is written on export and honoured on import, or
the file is refused in one line naming the key. Agreement with transformers on a long window is the test:
a Llama 3 scaled model (factor 8, theta 5e5) read back as plain rope differed by up to 1.38 in the logits
of the last 64 of 1024 positions, with 12% top-1 agreement."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.gguf import export_gguf
from lowbit.io.gguf_read import load_gguf
from lowbit.io.gguf_rope import rope_from_gguf

pytest.importorskip("gguf")
IDS = torch.randint(0, 512, (1, 1024), generator=torch.Generator().manual_seed(0))


def scaled_llama(rope: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                         rope_parameters={"rope_theta": 500000.0, **rope})
    return LlamaForCausalLM(config).eval()


def last_logits(model):
    with torch.no_grad():
        return model(IDS).logits[0, -64:]


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "linear", "factor": 4.0},
], ids=["llama3-8", "llama3-32", "linear-4"])
def test_a_scaled_rope_survives_gguf(rope, tiny_tokenizer, tmp_path):
    from gguf import GGUFReader
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = scaled_llama(rope)
    path = export_gguf(model, tmp_path / "m.gguf", type="F32", tokenizer=tiny_tokenizer)
    if rope["rope_type"] == "llama3":   # the file holds the divisors transformers' own llama3 rope applies
        stored = {t.name: np.array(t.data) for t in GGUFReader(path).tensors}["rope_freqs.weight"]
        plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config)
        assert np.allclose(stored, (plain / scaled).numpy(), rtol=1e-5)
    loaded, _ = load_gguf(path, dequantize=True)
    ref, got = last_logits(model), last_logits(loaded)
    assert float((got - ref).abs().max()) < 1e-4
    assert bool((got.argmax(-1) == ref.argmax(-1)).all())


META = {"general.architecture": "llama"}


@pytest.mark.parametrize("key, value", [("llama.final_logit_softcapping", 30.0), ("llama.attention.sliding_window", 4096),
                                        ("llama.rope.scaling.type", "yarn"), ("llama.expert_count", 8),
                                        ("llama.logit_scale", 0.5)])
def test_keys_that_change_the_arithmetic_are_refused_by_name(key, value):
    with pytest.raises(LowbitError) as e:
        rope_from_gguf({**META, key: value}, {}, 10000.0, 16)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_rope_freqs_other_than_llama3_are_refused_and_neutral_ones_ignored():
    odd = np.linspace(1.0, 3.0, 8, dtype=np.float32)
    with pytest.raises(LowbitError, match=r"^GGUF tensor rope_freqs.weight holds frequency factors"):
        rope_from_gguf(META, {"rope_freqs.weight": ((8,), "F32", odd)}, 10000.0, 16)
    ones = np.ones(8, dtype=np.float32)
    assert rope_from_gguf(META, {"rope_freqs.weight": ((8,), "F32", ones)}, 10000.0, 16)["rope_type"] == "default"
    assert rope_from_gguf({**META, "llama.logit_scale": 1.0}, {}, 10000.0, 16)["rope_type"] == "default"
