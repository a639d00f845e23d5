"""The bnb 4-bit export: bitsandbytes and transformers read it; our importer reads it back bit for bit."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.io import get_exporter, get_importer
from lowbit.io.bnb import bnb_linear_tensors, export_bnb, import_bnb
from lowbit.methods.nf4 import NF4, quantize_4bit
from lowbit.nn.linear4bit import Linear4bit

bnb = pytest.importorskip("bitsandbytes")
bnb_f = pytest.importorskip("bitsandbytes.functional")


def tiny_llama(seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        tie_word_embeddings=tie)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import lowbit.api as api

    model = tiny_llama()
    api.quantize(model, NF4(double_quant=True, compute_dtype="fp32"), progress=False)
    path = export_bnb(model, tmp_path_factory.mktemp("bnb") / "tiny-nf4")
    return model, path


def module_tensors(tensors, prefix):
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".weight")}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_layer_tensors_equal_bnb_linear4bit_state_dict(quant_type, double_quant):
    """bnb's Linear4bit quantises the same weight; its state_dict and our export are the same bytes,
    key for key, the quant_state JSON included."""
    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(3)) * 0.05
    ref = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=double_quant,
                            quant_type=quant_type)._quantize("cpu")
    theirs = {"weight": ref.data, **{f"weight.{k}": v for k, v in ref.quant_state.as_dict(packed=True).items()}}
    ours = {k.removeprefix("layer."): v
            for k, v in bnb_linear_tensors("layer", quantize_4bit(w, 64, quant_type, double_quant)).items()}
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_bitsandbytes_reads_the_export(exported):
    """QuantState.from_dict + dequantize_4bit, and Params4bit.from_prequantized inside bnb's own Linear4bit,
    give our weights and our layer outputs."""
    model, path = exported
    tensors = load_file(str(path / "model.safetensors"))
    x = torch.randn(3, 128)
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        own = module_tensors(tensors, name)
        stats = {k: v for k, v in own.items() if k != "weight"}
        state = bnb_f.QuantState.from_dict(dict(stats), device="cpu")
        assert torch.equal(bnb_f.dequantize_4bit(own["weight"], state), module.dequantized_weight())
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit.from_prequantized(own["weight"], dict(stats), device="cpu", module=layer)
        if module.in_features == 128:
            with torch.no_grad():
                torch.testing.assert_close(layer(x), module(x), rtol=1e-6, atol=1e-6)


def test_config_declares_bnb_4bit(exported):
    _, path = exported
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and not qc["load_in_8bit"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_compute_dtype"] == "float32" and qc["llm_int8_skip_modules"] == ["lm_head"]


def test_import_reads_it_back_bit_for_bit(exported):
    model, path = exported
    loaded, _ = get_importer("bnb")(path)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    theirs = {n: m for n, m in loaded.named_modules() if isinstance(m, Linear4bit)}
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    for n in ours:
        for key, t in ours[n].state_dict().items():
            assert torch.equal(theirs[n].state_dict()[key], t), f"{n}.{key}"
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_transformers_loads_the_export_on_cpu(exported):
    """transformers builds bnb Linear4bit modules from the folder. In train mode (the model has no dropout)
    bnb dequantises exactly and its logits equal ours; in eval mode, on a CPU with AVX512-BF16, bnb repacks
    the weight for a bf16 kernel (absmax and activations in bf16), so the logits agree to bf16 precision."""
    from transformers import AutoModelForCausalLM

    model, path = exported
    hf = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        ours = model(ids).logits
        hf.train()
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-5, atol=1e-5)
        hf.eval()
        eval_logits = hf(ids).logits
    assert float((eval_logits - ours).norm() / ours.norm()) < 2e-2


def test_tied_embeddings_written_once(tmp_path):
    import lowbit.api as api

    model = tiny_llama(tie=True)
    api.quantize(model, NF4(), progress=False)
    path = get_exporter("bnb")(model, tmp_path / "tied")
    keys = load_file(str(path / "model.safetensors")).keys()
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded, _ = import_bnb(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_user_errors(tmp_path):
    with pytest.raises(LowbitError, match="no NF4/FP4 Linear"):
        export_bnb(tiny_llama(), tmp_path / "plain")
    tiny_llama().save_pretrained(tmp_path / "hf")
    with pytest.raises(LowbitError, match="not a bitsandbytes 4-bit"):
        import_bnb(tmp_path / "hf")
    assert not (tmp_path / "plain").exists()
