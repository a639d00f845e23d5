"""The AQLM checkpoint layout: the `aqlm` package's QuantizedLinear, what transformers loads as quant_method
"aqlm" (shared/formats.md §10; Vahe1994/AQLM inference_lib aqlm/inference.py, utils.py, convert_to_hf.py).

Per quantised Linear with K inputs and N outputs, M codebooks of 2^B entries, groups of 8 inputs:

    codes      int8 (B = 8) or int16 (B = 16)  [N, K/8, M]   code c stored as its B-bit pattern
                                                            (c - 2^B where c >= 2^(B-1): aqlm's pack_int_data)
    codebooks  fp16  [M, 2^B, 1, 8]                          (out_group_size 1, in_group_size 8)
    scales     fp16  [N, 1, 1, 1]
    bias       [N]   when the Linear has one

    W[o, 8g + j] = scales[o] * sum_m codebooks[m, codes[o, g, m] mod 2^B, 0, j]

config.json's quantization_config: {"quant_method": "aqlm", "nbits_per_codebook": B, "num_codebooks": M,
"out_group_size": 1, "in_group_size": 8, "linear_weights_not_to_quantize": [...]}: one (M, B) per model.
Each Linear left in float is listed twice, by its module name (transformers 5 matches module names as
patterns: quantizers_utils.should_convert_module) and as "<name>.weight" (older transformers looked the
weight's path up in the list), so either version builds it as a float Linear.

The exporter copies lowbit's AQLMWeight (weights/codebook.py: uint8 or int16 codes [N, K/8, M], fp16
codebooks [M, 2^B, 8], fp16 row scales [N]) bit for bit and accepts nothing else: AQLM needs calibration
statistics, so there is no re-rounding into it. The importer checks every tensor against the config and
the model's Linears and rebuilds AQLMLinear modules from the same bits, so export -> import gives back the
same model. The layout has no compute dtype (the loader chooses it): imported modules compute in float32.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.e8 import DIM
from lowbit.io import Exporter, register_exporter, register_importer
from lowbit.io.hf_folder import (biases, finish_import, float_dtype, float_linears, float_tensors, mixed,
                                 plain_model, read_tensors, write_hf_folder)
from lowbit.io.progress import consumed, packed_tensors
from lowbit.nn.aqlm import AQLMLinear
from lowbit.pipeline.loading import set_module
from lowbit.weights.codebook import AQLMWeight

CODE_DTYPES = {8: torch.int8, 16: torch.int16}      # aqlm.utils.get_int_dtype for the code widths lowbit holds
HELD_DTYPES = {8: torch.uint8, 16: torch.int16}     # AQLMWeight's storage of the same bits
PARTS = ("codes", "codebooks", "scales")


# ---------------------------------------------------------------------------------------------------
# One weight <-> its AQLM tensors

def _fp16_values(t: torch.Tensor) -> bool:
    return t.is_floating_point() and bool(torch.isfinite(t).all()) and torch.equal(t.half().float(), t.float())


def aqlm_problem(q) -> str | None:
    """Why the AQLM layout cannot hold `q` exactly, or None when it can."""
    if type(q).__name__ == "QuipWeight":
        return "QuIP# holds lattice codes of a rotated weight, not AQLM's additive codebooks"
    if not isinstance(q, AQLMWeight):
        return f"the AQLM layout holds AQLM codebook weights only, not {type(q).__name__}"
    bits = {torch.uint8: 8, torch.int16: 16}.get(q.codes.dtype)
    if bits is None or q.codebooks.shape[1] != 1 << bits:
        return (f"AQLM codes index 2^8 or 2^16-entry codebooks; this weight has {q.codes.dtype} codes and "
                f"{q.codebooks.shape[1]}-entry codebooks")
    if not (_fp16_values(q.codebooks) and _fp16_values(q.scales)):
        return "AQLM stores finite fp16 codebooks and scales and these are not all such values"
    return None


def aqlm_tensors(name: str, q: AQLMWeight) -> dict[str, torch.Tensor]:
    """{"<name>.codes", "<name>.codebooks", "<name>.scales"} of one weight [N, K], the codes' bits unchanged."""
    if (problem := aqlm_problem(q)) is not None:
        raise LowbitError(f"{name}: {problem}")
    codes = q.codes.contiguous().view(CODE_DTYPES[q.code_bits])    # uint8 -> int8 keeps the bits (pack_int_data)
    tensors = {"codes": codes, "codebooks": q.codebooks.half().unsqueeze(2),
               "scales": q.scales.half().reshape(-1, 1, 1, 1)}
    return {f"{name}.{k}": t.contiguous().clone() for k, t in tensors.items()}


def codes_from_aqlm(codes: torch.Tensor, bits: int, where: str) -> torch.Tensor:
    """Stored codes (any integer dtype, read mod 2^bits as aqlm's unpack_int_data does) as AQLMWeight holds
    them; a value outside the signed or unsigned `bits`-bit range is an error."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise LowbitError(f"{where}: codes are {codes.dtype}, not integers")
    v = codes.to(torch.int64)
    if v.numel() and (int(v.min()) < -(1 << (bits - 1)) or int(v.max()) >= 1 << bits):
        raise LowbitError(f"{where}: codes from {int(v.min())} to {int(v.max())} are out of range for "
                          f"{1 << bits}-entry codebooks")
    v = v % (1 << bits)
    return (v if bits == 8 else torch.where(v >= 1 << 15, v - (1 << 16), v)).to(HELD_DTYPES[bits])


def _fp16_tensor(t: torch.Tensor, shape: tuple, what: str, where: str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise LowbitError(f"{where}: {what} are {list(t.shape)}, the config and the Linear need {list(shape)}")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise LowbitError(f"{where}: {what} hold NaN, infinite or non-float values")
    if not _fp16_values(t):
        raise LowbitError(f"{where}: {what} are not fp16 values (lowbit holds AQLM's fp16 {what})")
    return t.half()


def weight_from_aqlm(parts: dict[str, torch.Tensor], n_out: int, n_in: int, m: int, bits: int,
                     where: str) -> AQLMWeight:
    """The AQLMWeight of one Linear [n_out, n_in] from its codes, codebooks and scales, each checked against
    the config's (m codebooks of 2^bits entries) and the Linear's shape."""
    codes = parts["codes"]
    if n_in % DIM or tuple(codes.shape) != (n_out, n_in // DIM, m):
        raise LowbitError(f"{where}: codes are {list(codes.shape)}, a {n_out}x{n_in} Linear with {m} codebooks "
                          f"needs [{n_out}, {n_in / DIM:g}, {m}]")
    books = _fp16_tensor(parts["codebooks"], (m, 1 << bits, 1, DIM), "codebooks", where)
    scales = _fp16_tensor(parts["scales"], (n_out, 1, 1, 1), "scales", where)
    return AQLMWeight(codes_from_aqlm(codes, bits, where), books.squeeze(2).contiguous(),
                      scales.reshape(-1).contiguous())


# ---------------------------------------------------------------------------------------------------
# Which Linears stay in float

def not_to_quantize(names) -> list[str]:
    """linear_weights_not_to_quantize for float Linears `names`: each by module name and by weight path."""
    return sorted(x for n in names for x in (n, f"{n}.weight"))


def kept_in_float(name: str, patterns: list[str], where: str) -> bool:
    """Whether transformers builds the Linear `name` as a float Linear: "<name>.weight" is listed (older
    transformers), or a pattern matches the name as transformers 5.24's should_convert_module does (from
    the start to a module boundary, as a regex, or as a suffix)."""
    if f"{name}.weight" in patterns:
        return True
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)
    except re.error as e:
        raise LowbitError(f"{where}: linear_weights_not_to_quantize holds an invalid pattern ({e})") from None


# ---------------------------------------------------------------------------------------------------
# Export

def code_shape(q: AQLMWeight) -> tuple[int, int]:
    """(codebooks, bits per code): the one pair an AQLM folder stores."""
    return q.codebooks.shape[0], q.code_bits


def quantization_config(weights: dict[str, AQLMWeight], kept: list[str]) -> dict:
    m, bits = code_shape(next(iter(weights.values())))
    return {"quant_method": "aqlm", "nbits_per_codebook": bits, "num_codebooks": m, "out_group_size": 1,
            "in_group_size": DIM, "linear_weights_not_to_quantize": not_to_quantize(kept)}


class AQLMExporter(Exporter):
    """The `aqlm` package's checkpoint layout (transformers' quant_method "aqlm"). dtype: what the float
    tensors and biases are stored in ("fp16", as AQLM's own checkpoints; "bf16", "fp32", None: as held);
    codebooks and scales are always fp16."""

    name = "aqlm"
    requantize_with = None          # AQLM needs calibration statistics: nothing is rounded into it

    def problem(self, weight) -> str | None:
        return aqlm_problem(weight)

    def model_problem(self, weights: dict) -> str | None:
        return mixed(weights, "codebook shape", code_shape, lambda v: f"{v[0]}x{v[1]} codebooks")

    def write(self, model, weights, out, tokenizer=None, dtype: str | None = "fp16", progress: bool = False,
              **_options) -> Path:
        floats_dtype = float_dtype(dtype)
        if not weights:
            raise LowbitError("no AQLM-quantised Linear to export in the aqlm layout (quantise with aqlm first)")
        _refuse_conv1d(model, weights)
        floats = {**float_tensors(model, weights, floats_dtype), **biases(model, weights, floats_dtype)}
        tensors = packed_tensors(floats, weights, aqlm_tensors, "AQLM tensors", progress)
        qc = quantization_config(weights, float_linears(model))
        return write_hf_folder(out, model, tensors, tokenizer, qc, floats_dtype)


def _refuse_conv1d(model: nn.Module, weights: dict) -> None:
    conv1d = [n for n in weights if getattr(model.get_submodule(n), "hf_conv1d", False)]
    if conv1d:
        # transformers replaces nn.Linear modules only: a Conv1D would load with its weight missing
        raise LowbitError(f"aqlm: {conv1d[0]} is a Conv1D layer in transformers' {model.config.model_type}, which "
                          f"the aqlm integration does not replace; keep it in full precision (--skip {conv1d[0]})")


EXPORTER = register_exporter(AQLMExporter())
export_aqlm = EXPORTER.export


# ---------------------------------------------------------------------------------------------------
# Import

def read_aqlm_config(path: Path) -> dict:
    """config.json's quantization_config, checked to be an AQLM layout lowbit holds (groups of 8 inputs,
    one output, 2^8 or 2^16-entry codebooks)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LowbitError(f"not a model folder: {path} (no config.json)")
    try:
        qc = json.loads(cfg_file.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise LowbitError(f"{cfg_file} is not a valid config: {e}")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != "aqlm":
        raise LowbitError(f"{path} is not an AQLM checkpoint (quant_method {method!r})")
    shape = {k: qc.get(k, default) for k, default in (("in_group_size", 8), ("out_group_size", 1),
                                                      ("num_codebooks", 1), ("nbits_per_codebook", 16))}
    if any(type(v) is not int for v in shape.values()) or shape["num_codebooks"] < 1:
        raise LowbitError(f"{cfg_file}: the AQLM group sizes and codebook counts must be positive integers, "
                          f"got {shape}")
    if (shape["in_group_size"], shape["out_group_size"]) != (DIM, 1) or shape["nbits_per_codebook"] not in CODE_DTYPES:
        raise LowbitError(f"{path}: lowbit reads AQLM with groups of 8 inputs and 1 output and 2^8 or 2^16-entry "
                          f"codebooks; this one has {shape}")
    kept = qc.get("linear_weights_not_to_quantize") or []
    if not isinstance(kept, list) or not all(isinstance(k, str) for k in kept):
        raise LowbitError(f"{cfg_file}: linear_weights_not_to_quantize must be a list of names")
    return {**shape, "kept": kept}


def _quantized_names(model: nn.Module, tensors: dict, qc: dict, where: str) -> list[str]:
    """The Linears the config quantises; each must hold codes, codebooks and scales, the others a weight."""
    names = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        quantized = not getattr(m, "hf_conv1d", False) and not kept_in_float(name, qc["kept"], where)
        has = [p for p in PARTS if f"{name}.{p}" in tensors]
        if quantized and len(has) != len(PARTS):
            raise LowbitError(f"{where}: {name} is quantised by the config but the file lacks its "
                              f"{', '.join(p for p in PARTS if p not in has)}")
        if not quantized and has:
            raise LowbitError(f"{where}: {name} holds AQLM {has[0]} but transformers keeps it in float "
                              "(linear_weights_not_to_quantize lists it, or it is a Conv1D)")
        if quantized:
            names.append(name)
    return names


def _aqlm_linear(model: nn.Module, tensors: dict, name: str, qc: dict, where: str) -> AQLMLinear:
    linear = model.get_submodule(name)
    parts = {p: tensors.pop(f"{name}.{p}") for p in PARTS}
    q = weight_from_aqlm(parts, linear.out_features, linear.in_features, qc["num_codebooks"],
                         qc["nbits_per_codebook"], f"{where}: {name}")
    bias = tensors.pop(f"{name}.bias", None)
    if (bias is None) != (linear.bias is None):
        raise LowbitError(f"{where}: {name} {'lacks its' if bias is None else 'holds a'} bias, the model's Linear "
                          f"{'has one' if bias is None else 'has none'}")
    if bias is not None and (tuple(bias.shape) != (linear.out_features,) or not bias.is_floating_point()):
        raise LowbitError(f"{where}: {name}.bias is {bias.dtype} {list(bias.shape)}, "
                          f"not [{linear.out_features}] floats")
    return AQLMLinear.from_weight(q, None if bias is None else bias.float())


def import_aqlm(path, progress: bool = False):
    """(model, tokenizer or None) from an AQLM folder, its quantised Linears as lowbit AQLMLinear (float32
    compute); progress: bars over the tensors read and unpacked, on stderr."""
    path = Path(path)
    qc = read_aqlm_config(path)
    tensors = read_tensors(path, progress)
    model = plain_model(path)
    names = _quantized_names(model, tensors, qc, path.name)
    with consumed(tensors, "unpacking AQLM", progress) as tick:
        for name in names:
            set_module(model, name, _aqlm_linear(model, tensors, name, qc, path.name))
            tick()
    return finish_import(model, tensors, path)


register_importer("aqlm", import_aqlm)

__all__ = ["export_aqlm", "import_aqlm", "aqlm_tensors", "weight_from_aqlm", "codes_from_aqlm", "quantization_config"]
