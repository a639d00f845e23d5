"""Shared fixtures: a tiny tokenizer and tiny random-initialised models of several architectures."""
from __future__ import annotations

import os

import pytest
import torch

from lowbit.data import bundled_text

# Without a GPU the Triton kernel's tests run it in Triton's interpreter, which Triton reads once, when it is
# first imported, and torch.compile (in other tests) imports it: so the switch is set before anything runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_VOCAB = 512


@pytest.fixture(scope="module")
def one_thread():
    """The ggml searches are many small tensor ops: on a shared machine extra threads only add waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([bundled_text("calibration")[:60000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_config(arch: str):
    import transformers as t

    common = dict(vocab_size=TINY_VOCAB)
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": t.LlamaConfig, "mistral": t.MistralConfig, "qwen2": t.Qwen2Config}[arch]
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "gpt2":
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    if arch == "opt":
        return t.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=64, **common)
    if arch in ("bert", "roberta", "xlm-roberta"):
        cls = {"bert": t.BertConfig, "roberta": t.RobertaConfig, "xlm-roberta": t.XLMRobertaConfig}[arch]
        return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=128, **common)
    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch in ("qwen3", "gemma", "gemma2"):
        cls = {"qwen3": t.Qwen3Config, "gemma": t.GemmaConfig, "gemma2": t.Gemma2Config}[arch]
        return cls(head_dim=16, **decoder)
    if arch == "phi3":
        return t.Phi3Config(pad_token_id=0, **decoder)
    if arch == "mixtral":
        return t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **decoder)
    if arch == "qwen2_moe":
        return t.Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                                num_experts_per_tok=2, **decoder)
    raise ValueError(arch)


ENCODERS = ("bert", "roberta", "xlm-roberta")


def build_tiny_model(arch: str, seed: int = 0):
    import transformers as t

    torch.manual_seed(seed)
    config = tiny_config(arch)
    model = t.AutoModel.from_config(config) if arch in ENCODERS else t.AutoModelForCausalLM.from_config(config)
    return model.eval()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """Factory: tiny_model_dir("llama") -> folder with config, safetensors weights and tokenizer."""

    def make(arch: str = "llama"):
        path = tmp_path / f"tiny-{arch}"
        build_tiny_model(arch).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        return path

    return make


def fp16_llama_folder(path):
    """A tiny fp16 Llama folder (2 layers, hidden 64, vocabulary 4096) with the bundled tokenizer's files."""
    import shutil
    from pathlib import Path

    import transformers as t

    torch.manual_seed(0)
    config = t.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, vocab_size=4096)
    t.LlamaForCausalLM(config).to(torch.float16).save_pretrained(path)
    bundled = Path(__file__).resolve().parents[1] / "data" / "lowbit-tiny-llama"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled / name, Path(path) / name)
    return Path(path)


def module_output(block, module, x):
    """`module`'s output in a plain full run of `block` on the BlockInput x (forward hook; the first tensor
    of a tuple output)."""
    from lowbit.pipeline.blocks import run_block

    seen = []
    h = module.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        run_block(block, x)
    finally:
        h.remove()
    return seen[0]
