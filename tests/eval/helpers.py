"""Tiny models and direct (loop-per-window) computations the eval tests compare against."""
import copy

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab: int = 512, max_positions: int = 256, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=max_positions)
    return LlamaForCausalLM(config).eval()


def perturbed(model, seed=5, size=0.02):
    """A copy of `model` with Gaussian noise added to every parameter (a stand-in for quantisation)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * size)
    return other


def direct_kl_top1(ref_model, model, windows):
    """Mean KL(p_ref || p) and top-1 agreement, one window at a time, in float64, via F.kl_div."""
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            ref = F.log_softmax(ref_model(w[None]).logits[0, :-1].double(), -1)
            lp = F.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            kl += float(F.kl_div(lp, ref, log_target=True, reduction="sum"))
            agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
            n += ref.shape[0]
    return kl / n, agree / n
