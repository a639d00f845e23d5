"""compressed-tensors exports checked by the compressed-tensors package itself and by transformers."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as t

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.io import get_exporter, get_importer, quantized_weights
from lowbit.io.compressed_tensors import pack_rows, unpack_rows

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402

METHODS = ["rtn-int4-g32", "rtn-uint4-g64", "rtn-int8", "gptq-int3-g32", "rtn-int2-g32-asym", "awq-uint4-g32",
           "w8a8", "w8a8-static", "smoothquant-static", "rtn-fp8_e4m3-channel", "rtn-fp8_e4m3-tensor",
           "rtn-fp8_e4m3-a8dyn", "rtn-fp8_e4m3-tensor-a8static", "rtn-mxint8", "rtn-nvfp4", "gptq-nvfp4", "rtn-mxfp4",
           "gptq-mxfp4", "rtn-mxfp6_e2m3", "rtn-mxfp8_e4m3"]
# compressed-tensors decompresses NVFP4 to bfloat16 (unpack_fp4_from_uint8's dtype): its weight is ours rounded
# once to bf16. MX values (a few significant bits times a power of two) are exact in bf16.
DECOMPRESSED_IN_BF16 = {"rtn-nvfp4", "gptq-nvfp4"}


def small_llama():
    torch.manual_seed(0)
    config = t.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    return t.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base():
    return small_llama()


def quantised(base, method, tokenizer):
    return api.quantize(copy.deepcopy(base), method, tokenizer=tokenizer, n_samples=4, seq_len=32, progress=False)


def module_state(tensors: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".") and "." not in k[len(name) + 1:]}


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [32, 40, 96, 100])
def test_packing_is_compressed_tensors_packing(bits, cols):
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=torch.Generator().manual_seed(bits))
    ours = pack_rows(signed.to(torch.int64) + (1 << (bits - 1)), bits)
    assert torch.equal(ours, pack_to_int32(signed.to(torch.int8), bits))
    assert torch.equal(unpack_rows(ours, bits, cols), signed + (1 << (bits - 1)))


@pytest.mark.parametrize("method", METHODS)
def test_compressed_tensors_decompresses_our_files_to_our_weights(base, tiny_tokenizer, tmp_path, method):
    from safetensors.torch import load_file

    model = quantised(base, method, tiny_tokenizer)
    out = get_exporter("compressed-tensors").export(model, tmp_path / "ct", tokenizer=tiny_tokenizer)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)                      # their parser accepts our config
    tensors = load_file(str(out / "model.safetensors"))
    for name, w in quantized_weights(model).items():
        group = next(g for g in config.config_groups.values() if "Linear" in g.targets or name in g.targets)
        scheme = QuantizationScheme.model_validate(group.model_dump())
        state = BaseCompressor.load_from_registry(group.format).decompress(module_state(tensors, name), scheme)
        ours = w.dequantize().float()
        if method in DECOMPRESSED_IN_BF16:
            assert state["weight"].dtype == torch.bfloat16
            ours = ours.to(torch.bfloat16).float()
        assert torch.equal(state["weight"].float(), ours), name


@pytest.mark.parametrize("method,preset", [("rtn-nvfp4", "NVFP4A16"), ("rtn-mxfp4", "MXFP4A16"),
                                           ("rtn-mxfp6_e2m3", "MXFP6A16"), ("rtn-mxfp8_e4m3", "MXFP8A16")])
def test_microscaling_exports_equal_compressed_tensors_own_compression(base, tiny_tokenizer, tmp_path, method, preset):
    """compressed-tensors' own compressor, given our dequantised weight and float scales under its preset
    scheme (what llm-compressor writes), stores the same bytes we do: codes, E4M3/E8M0 scales, global scale."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from safetensors.torch import load_file

    model = quantised(base, method, tiny_tokenizer)
    out = get_exporter("compressed-tensors").export(model, tmp_path / "ct", tokenizer=tiny_tokenizer)
    tensors = load_file(str(out / "model.safetensors"))
    scheme = preset_name_to_scheme(preset, ["Linear"])
    group = next(iter(json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()))
    storage = {"num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "scale_dtype"}
    ours = QuantizationScheme.model_validate(group).weights
    assert ours.model_dump(include=storage) == scheme.weights.model_dump(include=storage)   # their preset's storage
    compressor = BaseCompressor.load_from_registry(group["format"])
    for name, w in quantized_weights(model).items():
        state = {"weight": w.dequantize().float(), "weight_scale": w.scale.float().reshape(w.shape[0], -1)}
        if "global_scale" in w.extras:   # compressed-tensors' scale is s (E4M3) and G divides it
            state["weight_scale"] = state["weight_scale"] * w.extras["global_scale"]
            state["weight_global_scale"] = w.extras["global_scale"]
        theirs = compressor.compress(state, scheme)
        mine = module_state(tensors, name)
        assert theirs.keys() == mine.keys(), name
        for key in mine:
            assert theirs[key].dtype == mine[key].dtype, (name, key)
            assert torch.equal(element_values(theirs[key], key, w), element_values(mine[key], key, w)), (name, key)


def element_values(t: torch.Tensor, key: str, w) -> torch.Tensor:
    """A stored tensor as comparable values: element codes decoded (compressed-tensors writes +0 where the
    rounding gave -0, which lowbit keeps, as the OCP rule and torchao do: equal values, other bits), scales
    as their bytes."""
    from lowbit.io.compressed_tensors import unpack_fp4, unpack_fp6

    if key == "weight_packed":
        codes = unpack_fp6(t) if w.spec.format == "fp6_e2m3" else unpack_fp4(t)
        return w.spec.number_format.decode(codes)
    if key == "weight":
        return t.float()
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


# Asymmetric pack-quantized files are left out: transformers 5.24 with compressed-tensors 0.20 builds the
# zero point unpacked ([N, G]) on the meta device and then refuses the packed [N*b/32, G] tensor that
# compressed-tensors' own compressor writes and decompresses (tested above).
@pytest.mark.parametrize("method", ["rtn-int4-g32", "gptq-int3-g32", "w8a8", "rtn-fp8_e4m3-channel"])
def test_transformers_loads_our_export_and_computes_our_logits(base, tiny_tokenizer, tmp_path, method):
    model = quantised(base, method, tiny_tokenizer)
    out = get_exporter("compressed-tensors").export(model, tmp_path / "ct", tokenizer=tiny_tokenizer, dtype="fp32")
    loaded = t.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(ids).logits          # the first forward decompresses the weights
        if method != "w8a8":                 # transformers runs W8A8 with float activations
            assert torch.allclose(logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    theirs = dict(loaded.named_parameters())
    for name, w in quantized_weights(model).items():
        assert torch.equal(theirs[f"{name}.weight"].float(), w.dequantize().float()), name


@pytest.mark.parametrize("method", ["rtn-mxfp4", "rtn-mxfp6_e2m3", "rtn-mxfp8_e4m3", "rtn-nvfp4"])
def test_transformers_loads_our_microscaling_exports(base, tiny_tokenizer, tmp_path, method):
    """transformers + compressed-tensors decompress NVFP4 and MX files to bfloat16 weights (so the model is
    loaded in bf16): each equals our weight rounded to bf16 (MX: exactly ours), and the logits agree."""
    model = quantised(base, method, tiny_tokenizer)
    out = get_exporter("compressed-tensors").export(model, tmp_path / "ct", tokenizer=tiny_tokenizer, dtype="bf16")
    loaded = t.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(ids).logits.float()
    theirs = dict(loaded.named_parameters())
    for name, w in quantized_weights(model).items():
        ours = w.dequantize().float()
        if method != "rtn-nvfp4":
            assert torch.equal(ours.to(torch.bfloat16).float(), ours)   # MX values are exact in bf16
        assert torch.equal(theirs[f"{name}.weight"].float(), ours.to(torch.bfloat16).float()), name
    with torch.no_grad():
        expected = model(ids).logits
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()   # bf16 activations throughout


@pytest.mark.parametrize("method", METHODS)
def test_import_gives_back_the_same_weights(base, tiny_tokenizer, tmp_path, method):
    model = quantised(base, method, tiny_tokenizer)
    out = get_exporter("compressed-tensors").export(model, tmp_path / "ct", tokenizer=tiny_tokenizer)
    back, _ = get_importer("compressed-tensors")(out)
    ours, theirs = quantized_weights(model), quantized_weights(back)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert type(ours[name]) is type(theirs[name])
        assert torch.equal(ours[name].dequantize().float(), theirs[name].dequantize().float()), name


def test_mixed_schemes_get_one_config_group_each(base, tiny_tokenizer, tmp_path):
    from lowbit.methods import Recipe

    recipe = Recipe("rtn-int4-g32", overrides=[("*.mlp.down_proj", "rtn-int8"), ("*.self_attn.o_proj", None)])
    model = quantised(base, recipe, tiny_tokenizer)
    out = get_exporter("compressed-tensors").export(model, tmp_path / "ct", tokenizer=tiny_tokenizer)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = sorted(tuple(g["targets"]) for g in qc["config_groups"].values())
    assert len(targets) == 2 and all(n.endswith("down_proj") for n in targets[0] + targets[1] if "down" in n)
    assert "model.layers.0.self_attn.o_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
    back, _ = get_importer("compressed-tensors")(out)
    assert type(back.model.layers[0].self_attn.o_proj) is torch.nn.Linear


def test_what_it_cannot_hold_is_refused(base, tiny_tokenizer, tmp_path):
    model = quantised(base, "gptq-int4-g32-dynamic", tiny_tokenizer)   # act-order with a group index
    with pytest.raises(LowbitError, match="group index"):
        get_exporter("compressed-tensors").export(model, tmp_path / "x", tokenizer=tiny_tokenizer)
    assert not (tmp_path / "x").exists()
    for method in ("rtn-mxfp6_e3m2", "rtn-mxfp8_e5m2"):   # no compressed-tensors format of their own
        with pytest.raises(LowbitError, match="not MXFP6 E3M2 or MXFP8 E5M2"):
            get_exporter("compressed-tensors").export(quantised(base, method, tiny_tokenizer), tmp_path / "y",
                                                      tokenizer=tiny_tokenizer)
        assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("method,preset", [("rtn-nvfp4-a4", "NVFP4"), ("rtn-mxfp4-a4", "MXFP4"),
                                           pytest.param("rtn-mxfp8_e4m3-a8", "MXFP8", marks=pytest.mark.slow)])
def test_block_activation_exports_carry_the_presets_input_args_and_import_back(base, tiny_tokenizer, tmp_path,
                                                                              method, preset):
    """W4A4 / W8A8 block formats: compressed-tensors validates our config, whose weight and input args are
    its preset's (observers aside), decompresses our weights to ours; NVFP4 stores G_x as input_global_scale
    float32 [1]; the import gives back the same weights, G_x and logits, and refuses other activations."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from safetensors.torch import load_file

    model = quantised(base, method, tiny_tokenizer)
    out = get_exporter("compressed-tensors").export(model, tmp_path / "ct", tokenizer=tiny_tokenizer, dtype="fp32")
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    (group,) = config.config_groups.values()
    skip = {"observer", "observer_kwargs"}
    for part in ("weights", "input_activations"):
        assert getattr(group, part).model_dump(exclude=skip) == PRESET_SCHEMES[preset][part].model_dump(exclude=skip)
    tensors = load_file(str(out / "model.safetensors"))
    ours = quantized_weights(model)
    for name, w in ours.items():
        state = module_state(tensors, name)
        g = state.pop("input_global_scale", None)
        if preset == "NVFP4":
            assert g.dtype == torch.float32 and g.shape == (1,) and float(g) == w.input_global_scale > 0
        else:
            assert g is None
        scheme = QuantizationScheme.model_validate(group.model_dump())
        theirs = BaseCompressor.load_from_registry(group.format).decompress(state, scheme)["weight"].float()
        expected = w.dequantize().float()
        assert torch.equal(theirs, expected.to(torch.bfloat16).float() if preset == "NVFP4" else expected), name
    back, _ = get_importer("compressed-tensors")(out)
    theirs = quantized_weights(back)
    assert ours.keys() == theirs.keys()
    for name, w in ours.items():
        assert type(theirs[name]) is type(w) and theirs[name].input_global_scale == w.input_global_scale
        assert torch.equal(theirs[name].dequantize(), w.dequantize()), name
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)

    raw = json.loads((out / "config.json").read_text())
    raw["quantization_config"]["config_groups"]["group_0"]["input_activations"]["num_bits"] = 8
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LowbitError, match="same block format"):
        get_importer("compressed-tensors")(out)
