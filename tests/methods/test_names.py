"""One scheme value and one short-name grammar for every method."""
from __future__ import annotations

import pytest
import torch

from lowbit.core import QuantSpec, quantize
from lowbit.errors import LowbitError
from lowbit.methods import AWQ, GPTQ, METHODS, RTN, Recipe, method_from_dict, parse_method
from lowbit.methods.gptq import gptq_quantize
from lowbit.nn import QuantLinear

NAMES = ["rtn-int4-g128", "rtn-int8", "rtn-int4-g32-asym", "rtn-int4-g128-mse", "rtn-nf4-g64", "rtn-fp4_e2m1-g32",
         "rtn-int8-tensor", "gptq-int4-g128", "gptq-int3-g64-noactorder-dynamic", "gptq-nf4-g64", "gptq-int4-g128-asym-mse",
         "awq-int4-g128", "awq-int3-g64-sym-noclipqk-duo", "awq-int4-g128-layer", "smoothquant", "smoothquant-a0.8-static",
         "smoothquant-search", "w8a8", "w8a8-static", "llm-int8", "llm-int8-t4", "nf4", "nf4-dq-b128-fp32", "fp4",
         "ggml-q4_k", "ggml-q6_k-imatrix-ref", "q4_k_m", "q3_k_s-imatrix", "q8_0-ref", "hqq-int4-g64", "hqq-int2-g16-it10",
         "spqr-int3-g16", "spqr-int3-g16-actorder", "bitnet", "bitnet-2bit", "quip", "quip-3bit", "quip-4bit-seed1", "aqlm", "aqlm-1x16", "aqlm-1x8-r2-steps10", "rtn-mxfp4", "gptq-mxfp4", "rtn-nvfp4", "gptq-nvfp4",
         "rtn-mxfp8_e4m3", "rtn-mxfp8_e5m2", "rtn-mxfp6_e2m3", "rtn-mxfp6_e3m2", "rtn-mxint8", "gptq-mxint8",
         "rtn-fp8_e4m3-a8dyn", "rtn-fp8_e4m3-tensor-a8static", "rtn-fp8_e5m2-a8dyn", "qat-int3", "qat-nf4-g64",
         "rtn-nvfp4-a4", "gptq-nvfp4-a4", "rtn-mxfp4-a4", "gptq-mxfp4-a4", "rtn-mxfp8_e4m3-a8", "rtn-mxfp6_e3m2-a6"]


@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip_through_configs_and_dicts(name):
    config = parse_method(name)
    assert config.short_name() == name
    assert method_from_dict(config.to_dict()) == config


def test_every_method_has_a_name_here():
    mixes = {n for n, c in METHODS.items() if c.__name__.startswith("GGUF_")}
    assert set(METHODS) - mixes <= {parse_method(n).name for n in NAMES}


@pytest.mark.parametrize("name, word", [("rtn-int4-fast", "fast"), ("gptq-int4-g128-actordr", "actordr"),
                                        ("awq-int4-g-sym", "g-sym"), ("nf4-b12x", "b12x"), ("w8a8-int4", "int4"),
                                        ("ggml-q4_k-fast", "fast")])
def test_unknown_words_are_one_line_errors_naming_what_the_method_takes(name, word):
    with pytest.raises(LowbitError) as e:
        parse_method(name)
    message = str(e.value)
    assert "\n" not in message and (repr(word.split("-")[0]) in message or "unknown" in message)


def test_scheme_words_change_the_default_scheme():
    assert parse_method("awq-int4-g128") == AWQ() == parse_method("awq-uint4-g128")   # AWQ's default: asymmetric
    assert parse_method("rtn-int4-g128") == RTN() and RTN().scheme.symmetric
    assert parse_method("gptq-int4").scheme.granularity == "channel"     # a grid without a group: per channel
    assert parse_method("rtn-uint4-g64").scheme == QuantSpec("uint4", "group", 64, False)
    assert parse_method("rtn-nf4-b64").scheme == QuantSpec("nf4", "group", 64)


def test_shorthand_keywords_and_the_scheme_are_one_value():
    assert GPTQ(bits=3) == GPTQ(scheme="int3-g128") == GPTQ(scheme=QuantSpec("int3", "group", 128))
    assert GPTQ(bits=3).bits == 3 and GPTQ(group_size=None).group_size is None
    assert AWQ(symmetric=True).scheme.format == "int4" and AWQ(bits=3).scheme.format == "uint3"
    # dicts written before the scheme was one field still load
    old = {"method": "gptq", "bits": 3, "group_size": 64, "symmetric": False, "act_order": True}
    assert method_from_dict(old) == GPTQ(scheme="uint3-g64", act_order=True)
    for bad in (dict(bits=1), dict(bits=9), dict(group_size=0), dict(scheme="int4-g128-frobnicate")):
        with pytest.raises(LowbitError):
            GPTQ(**bad)


@pytest.mark.parametrize("scheme", ["nf4-g64", "fp4_e2m1-g32"])
def test_gptq_rounds_through_any_grid(scheme):
    """GPTQ onto code books and float grids (its gain over RTN there: tests/methods/test_gptq.py)."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 128, generator=g), torch.randn(512, 128, generator=g)
    q = gptq_quantize(w, 2 / 512 * x.T @ x, GPTQ(scheme=scheme))
    assert q.spec.format == GPTQ(scheme=scheme).scheme.format
    assert torch.isfinite(q.spec.number_format.decode(q.codes)).all()       # every code is one of the grid's
    assert torch.equal(QuantLinear.from_quantized(q).dequantized_weight(), q.dequantize())


def test_float_zero_points_are_stored_and_bound_the_error():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) + 0.3
    spec = QuantSpec("uint4", "group", 64, symmetric=False, zero_dtype="fp16")
    q = quantize(w, spec)
    assert not torch.equal(q.zero, q.zero.round())                      # free, not on the grid
    assert torch.equal(q.zero, q.zero.half().float())                   # stored at fp16
    step = q.scale.repeat_interleave(64, 1)
    assert ((q.dequantize() - w).abs() <= 0.5 * step * (1 + 1e-3) + 1e-6).all()
    assert q.storage_bits == 4 * w.numel() + (16 + 16) * q.scale.numel()
    m = QuantLinear.from_quantized(q)
    assert torch.equal(m.dequantized_weight(), q.dequantize()) and m.storage_bytes() * 8 == q.storage_bits


@pytest.mark.parametrize("name", ["rtn-int4-g128-g64", "rtn-int4-g64-tensor", "rtn-uint4-sym", "rtn-int4-nf4",
                                  "rtn-int4-g128-mse-minmax", "nf4-b64-b32", "gptq-int4-g128-actorder-actorder"])
def test_two_words_for_one_setting_are_an_error(name):
    with pytest.raises(LowbitError, match="both set"):
        parse_method(name)


@pytest.mark.parametrize("name", ["rtn-int4-g\u0661\u0662\u0668", "rtn-int\u0664", "gptq-int4-g-1", "rtn-e8m0",
                                  "awq-int4-tensor", "rtn-int4-token"])
def test_names_outside_the_grammar_are_refused(name):
    with pytest.raises(LowbitError):
        parse_method(name)


def test_dtype_words_name_every_setting_and_round_trip():
    for name in ["rtn-int4-g128-sfp32", "rtn-int4-g64-asym-zfp16", "gptq-int4-g32-asym-zbf16", "rtn-nf4-g64-sbf16"]:
        assert parse_method(name).short_name() == name
    assert RTN(format="uint4").short_name() == "rtn-int4-g128-asym"          # uintN: a zero point, as in names
    assert parse_method(RTN(format="uint4").short_name()) == RTN(format="uint4")


@pytest.mark.parametrize("make", [lambda: RTN(symmetric="false"), lambda: GPTQ(act_order="no"),
                                  lambda: RTN(group_size=True), lambda: RTN(bits=3, scheme="nf4-g64"),
                                  lambda: QuantSpec.from_dict({"format": "int4", "granularity": "group",
                                                               "group_size": 32, "symmetric": True, "typo": 1}),
                                  lambda: QuantSpec.from_dict({"format": "int4", "granularity": "channel"})])
def test_settings_of_the_wrong_type_are_errors(make):
    with pytest.raises(LowbitError):
        make()


@pytest.mark.parametrize("make", [lambda: Recipe("rtn-int8", overrides=[("*",)]),
                                  lambda: Recipe("rtn-int8", overrides={"*.down_proj": "rtn-int8"}),
                                  lambda: Recipe("rtn-int8", overrides=[(5, "rtn-int8")]),
                                  lambda: Recipe("rtn-int8", skip="lm_head"),
                                  lambda: Recipe(5),
                                  lambda: method_from_dict({"method": ["rtn"]})])
def test_malformed_recipes_are_errors(make):
    with pytest.raises(LowbitError):
        make()
