"""Linear4bit: outputs against bitsandbytes' Linear4bit and the closed form, storage, save/load."""
import pytest
import torch
import torch.nn.functional as F

from lowbit.methods.nf4 import NF4, quantize_4bit
from lowbit.nn import MODULES
from lowbit.nn.linear4bit import Linear4bit

bnb = pytest.importorskip("bitsandbytes")


def make_layer(out_features=96, in_features=128, double_quant=True, quant_type="nf4", compute=torch.float32,
               seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    b = torch.randn(out_features, generator=g) * 0.1
    q = quantize_4bit(w, 64, quant_type, double_quant)
    return w, b, Linear4bit.from_quantized(q, b, compute)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_output_equals_bitsandbytes_linear4bit(quant_type, double_quant):
    """bnb's Linear4bit quantises the same weight itself; both layers must give the same outputs. (A fresh
    bnb module is in train mode, where bnb dequantises exactly; in eval mode on an AVX512-BF16 CPU it
    repacks the weight for a bf16 kernel instead, see tests/io/test_bnb.py.)"""
    w, b, ours = make_layer(double_quant=double_quant, quant_type=quant_type)
    ref = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.float32, compress_statistics=double_quant,
                            quant_type=quant_type)
    ref.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=double_quant,
                                   quant_type=quant_type)._quantize("cpu")
    ref.weight.module = ref
    ref.quant_state = ref.weight.quant_state
    ref.bias = torch.nn.Parameter(b.clone(), requires_grad=False)
    x = torch.randn(5, 7, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    assert torch.equal(ours.qweight, ref.weight.data.reshape(-1))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_bf16_compute_is_one_rounding_of_inputs_and_weight():
    """Default compute dtype bf16: y = linear(bf16(x), bf16(W_dq), bf16(b)), returned in x's dtype."""
    _, b, ours = make_layer(compute=torch.bfloat16)
    assert Linear4bit(8, 8).compute_dtype == torch.bfloat16
    x = torch.randn(4, 128)
    w_dq = ours.dequantized_weight(torch.float32)
    expected = F.linear(x.bfloat16(), w_dq.bfloat16(), b.bfloat16()).float()
    with torch.no_grad():
        got = ours(x)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_gradient_reaches_the_input_not_the_weight():
    _, _, ours = make_layer()
    x = torch.randn(3, 128, requires_grad=True)
    grad_out = torch.randn(3, 96)
    ours(x).backward(grad_out)
    assert torch.allclose(x.grad, grad_out @ ours.dequantized_weight(torch.float32), atol=1e-6)
    assert all(not p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("double_quant", [False, True])
def test_storage_bytes_closed_form(double_quant):
    _, _, ours = make_layer(768, 256, double_quant)
    n, blocks = 768 * 256, 768 * 256 // 64
    scales = blocks + 4 * (-(-blocks // 256)) + 4 if double_quant else 4 * blocks
    assert ours.storage_bytes() == n // 2 + scales + 4 * 768  # codes + scales + fp32 bias
    assert 8 * (ours.storage_bytes() - 4 * 768) / n == ours.quantized().bits_per_element


def test_model_footprint_drops_to_the_promised_bits(tmp_path):
    """Quantise every block Linear of a tiny Llama: the held bytes of those Linears are exactly the codes
    and scales (4.5 bits/weight), and the model answers the same after a native save and load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit.api as api
    from lowbit.eval.memory import model_memory

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    linear_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and "layers" in n)
    before = model_memory(model).total_bytes
    api.quantize(model, NF4(compute_dtype="fp32"), progress=False)
    mem = model_memory(model)
    assert mem.quantized_linears == 14 and mem.quantized_weight_params == linear_params
    assert mem.bits_per_weight == 4.5
    assert before - mem.total_bytes == linear_params * 4 - linear_params * 4.5 / 8
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        out = model(ids).logits
    api.save(model, tmp_path / "nf4")
    loaded, _ = api.load(tmp_path / "nf4")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, Linear4bit)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)


def test_layer_config_round_trip_and_registry():
    _, _, ours = make_layer(double_quant=True)
    rebuilt = MODULES["Linear4bit"].from_layer_config(ours.layer_config())
    rebuilt.load_state_dict(ours.state_dict())
    assert torch.equal(rebuilt.dequantized_weight(), ours.dequantized_weight())
    assert rebuilt.layer_config() == ours.layer_config()
