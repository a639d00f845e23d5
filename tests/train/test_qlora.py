"""QLoRA: LoRA layers (closed form), training, PEFT-compatible save that peft itself loads, the CLI."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.methods.nf4 import NF4
from lowbit.nn.linear4bit import Linear4bit
from lowbit.train.qlora import (LoraLinear, LoraSettings, TrainSettings, add_lora, load_adapter, lora_modules,
                                save_adapter, train_lora)

peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64)).eval()


def nf4_llama(seed=0, double_quant=True):
    import lowbit.api as api

    return api.quantize(tiny_llama(seed), NF4(double_quant=double_quant, compute_dtype="fp32"), progress=False)


def randomise_adapters(model, seed=1):
    """Training leaves B non-zero; give every adapter random A and B so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        m.lora_A.weight.data = torch.randn(m.lora_A.weight.shape, generator=g) * 0.1
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_lora_starts_at_the_base_and_follows_the_closed_form():
    base = torch.nn.Linear(32, 24)
    lora = LoraLinear(base, rank=4, alpha=8, dropout=0.0)
    x = torch.randn(5, 32)
    assert torch.equal(lora(x), base(x))  # B starts at zero
    lora.lora_B.weight.data = torch.randn(24, 4)
    expected = base(x) + x @ lora.lora_A.weight.T @ lora.lora_B.weight.T * (8 / 4)
    torch.testing.assert_close(lora(x), expected)


def test_add_lora_freezes_the_base_and_wraps_only_targets():
    model = nf4_llama()
    names = add_lora(model, LoraSettings(rank=4, alpha=8, target_modules=TARGETS))
    assert len(names) == 2 * len(TARGETS)
    assert all(isinstance(model.get_submodule(n).base, Linear4bit) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    with pytest.raises(LowbitError):
        add_lora(tiny_llama(), LoraSettings(target_modules=("no_such_layer",)))


def test_saved_folder_has_peft_names_and_config(tmp_path):
    model = nf4_llama()
    add_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.1, target_modules=TARGETS))
    save_adapter(model, tmp_path / "a", "some/base")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (
        "LORA", "CAUSAL_LM", 4, 8, 0.1)
    assert sorted(cfg["target_modules"]) == sorted(TARGETS) and cfg["base_model_name_or_path"] == "some/base"
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 16


def test_peft_loads_our_adapters_onto_the_full_precision_base(tmp_path):
    """LoRA on the unquantised model: peft.PeftModel.from_pretrained on a fresh copy of the base
    reproduces our logits."""
    ours = tiny_llama()
    add_lora(ours, LoraSettings(rank=4, alpha=8, target_modules=TARGETS))
    randomise_adapters(ours)
    save_adapter(ours, tmp_path / "fp")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "fp").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(theirs), logits(tiny_llama()), atol=1e-3)  # the adapters do something


def test_peft_loads_our_qlora_adapters_onto_the_nf4_dequantised_base(tmp_path):
    """QLoRA on the NF4 base: peft on a plain model holding the dequantised NF4 weights gives our logits."""
    ours = nf4_llama()
    add_lora(ours, LoraSettings(rank=4, alpha=8, target_modules=TARGETS))
    randomise_adapters(ours)
    save_adapter(ours, tmp_path / "q")
    dequantised = tiny_llama()
    reference_nf4 = nf4_llama()
    for name, module in reference_nf4.named_modules():
        if isinstance(module, Linear4bit):
            dequantised.get_submodule(name).weight.data = module.dequantized_weight(torch.float32)
    theirs = peft.PeftModel.from_pretrained(dequantised, tmp_path / "q").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


def test_load_adapter_reproduces_the_saved_model(tmp_path):
    ours = nf4_llama()
    add_lora(ours, LoraSettings(rank=4, alpha=8, target_modules=TARGETS))
    randomise_adapters(ours)
    save_adapter(ours, tmp_path / "q")
    again = nf4_llama()
    load_adapter(again, tmp_path / "q")
    assert torch.equal(logits(again), logits(ours))


def training_ids(n=4000):
    """A learnable stream: 95% of tokens drawn from 8 of the 128 (loss can fall from ln 128 towards ln 8)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 11, (n,), generator=g)
    noise = torch.rand(n, generator=g) < 0.05
    return torch.where(noise, torch.randint(0, 128, (n,), generator=g), ids)


def test_training_lowers_the_loss_and_touches_only_adapters():
    model = nf4_llama()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraSettings(rank=8, alpha=16, dropout=0.0, target_modules=TARGETS))
    ids = training_ids()
    batch = ids[:33].reshape(1, -1)
    with torch.no_grad():
        before = model(input_ids=batch, labels=batch).loss.item()
    result = train_lora(model, ids, TrainSettings(steps=20, lr=1e-2, batch_size=4, seq_len=32, warmup=3))
    with torch.no_grad():
        after = model(input_ids=batch, labels=batch).loss.item()
    # the random base predicts about uniformly (ln 128 = 4.85); the frozen random lm_head caps how far
    # the adapters can push the logits, but they must beat the uniform predictor clearly
    assert after < min(before, math.log(128)) - 0.25
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.25
    for key, value in frozen.items():
        wrapped = key.replace(".q_proj.", ".q_proj.base.").replace(".v_proj.", ".v_proj.base.")
        wrapped = wrapped.replace(".o_proj.", ".o_proj.base.").replace(".down_proj.", ".down_proj.base.")
        assert torch.equal(model.state_dict()[wrapped], value), key


def test_training_is_deterministic_and_checkpointing_changes_nothing():
    runs = []
    for checkpointing in (False, False, True):
        model = nf4_llama()
        add_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.1, target_modules=TARGETS, seed=3))
        result = train_lora(model, training_ids(), TrainSettings(steps=3, lr=1e-3, batch_size=2, seq_len=16,
                                                                 warmup=1, seed=7,
                                                                 gradient_checkpointing=checkpointing))
        runs.append((result.losses, {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert runs[2][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert all(torch.allclose(runs[0][1][k], runs[2][1][k], atol=1e-6) for k in runs[0][1])


def test_finetune_command_end_to_end(tiny_model_dir, tmp_path):
    """`lowbit finetune` on a tiny model folder: the perplexity it reports is the one peft reproduces from
    the saved folder on the NF4-dequantised base, and training lowered it."""
    from lowbit.cli import main
    from lowbit.data import bundled_text
    from lowbit.eval.perplexity import perplexity
    from lowbit.pipeline.loading import load_model

    model_dir = tiny_model_dir("llama")
    text = bundled_text("calibration")
    (tmp_path / "train.txt").write_text(text[:20000])
    (tmp_path / "eval.txt").write_text(text[20000:24000])
    out = tmp_path / "adapter"
    rc = main(["finetune", str(model_dir), "-o", str(out), "--steps", "12", "--batch-size", "4", "--seq-len", "64",
               "--lr", "3e-3", "--rank", "4", "--target", "q_proj,v_proj,down_proj", "--quant", "nf4",
               "--compute-dtype", "fp32",
               "--train-file", str(tmp_path / "train.txt"), "--eval-file", str(tmp_path / "eval.txt"), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "lowbit_finetune.json").read_text())
    assert summary["perplexity_after"] < summary["perplexity_before"]

    base, tok = load_model(model_dir)
    nf4 = nf4_from(model_dir)
    for name, module in nf4.named_modules():
        if isinstance(module, Linear4bit):
            base.get_submodule(name).weight.data = module.dequantized_weight(torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor(tok((tmp_path / "eval.txt").read_text())["input_ids"])
    with torch.no_grad():
        ppl = perplexity(theirs, ids, summary["eval_context"]).perplexity
    assert ppl == pytest.approx(summary["perplexity_after"], rel=1e-4)
    with pytest.raises(SystemExit):
        main(["finetune", str(model_dir), "--steps", "0", "-o", str(tmp_path / "x")])


def nf4_from(model_dir):
    import lowbit.api as api

    model, _ = api.load_model(model_dir)
    return api.quantize(model, NF4(compute_dtype="fp32"), progress=False)
