"""The AWQ GEMM checkpoint layout (AutoAWQ; what transformers, vLLM and TGI load as quant_method "awq").

Per quantised Linear with K inputs, N outputs and G = K / group_size groups (shared/formats.md §5):

    qweight  int32 [K, N/8]   4-bit codes of W^T, packed along the output dim
    qzeros   int32 [G, N/8]   4-bit zero points, packed the same way, stored as-is (no -1 offset)
    scales   fp16  [G, N]
    bias     fp16  [N]

Within a word, nibble i (bits 4i..4i+3) holds output column 8*word + AWQ_ORDER[i], the interleave
AutoAWQ's GEMM kernel expects. Dequantisation: (q - zero) * scale.

The exporter accepts 4-bit integer weights in contiguous groups with fp16 scales (the AWQ method's
output; any RTN/GPTQ int4 group weight without act-order fits too) and never re-quantises them: a
signed int4 grid is shifted by 8 into the unsigned one, zero points with it. Everything else is written
at fp16. The importer rebuilds QuantLinear modules (uint4, asymmetric, fp16 scales) from the
same tensors, so export -> import gives back the identical quantised values.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.core import QuantizedTensor, QuantSpec
from lowbit.errors import LowbitError
from lowbit.io import Exporter, register_exporter, register_importer
from lowbit.io.hf_folder import (biases, finish_import, float_linears, float_tensors, mixed, one_value, output_head,
                                 plain_model, read_tensors, write_hf_folder)
from lowbit.io.progress import consumed, packed_tensors
from lowbit.nn import QuantLinear
from lowbit.pipeline.loading import set_module

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK = 8                      # 4-bit values per int32 word
IMPORT_SPEC_FORMAT = "uint4"


# ---------------------------------------------------------------------------------------------------
# Packing

def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[R, C] integers in 0..15 -> int32 [R, C/8], interleaved in AWQ_ORDER along the last dim."""
    if values.shape[-1] % PACK:
        raise LowbitError(f"AWQ packs 8 columns per int32; {values.shape[-1]} columns is not a multiple of 8")
    v = values.to(torch.int64)
    if bool(((v < 0) | (v > 15)).any()):
        raise LowbitError("AWQ packing takes 4-bit values (0..15)")
    v = v.reshape(*v.shape[:-1], -1, PACK)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for nibble, column in enumerate(AWQ_ORDER):
        words |= v[..., column] << (4 * nibble)
    # the top nibble reaches the sign bit of an int32: keep the bit pattern
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] -> int64 [R, 8W] of 4-bit values in logical column order."""
    w = words.to(torch.int64)
    out = torch.empty(*w.shape, PACK, dtype=torch.int64)
    for nibble, column in enumerate(AWQ_ORDER):
        out[..., column] = (w >> (4 * nibble)) & 0xF
    return out.reshape(*w.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------------
# QuantizedTensor <-> AWQ tensors

def awq_problem(q) -> str | None:
    """Why the AWQ GEMM layout cannot hold `q` exactly, or None when it can."""
    if not isinstance(q, QuantizedTensor):
        return f"AWQ GEMM holds 4-bit integer weights, not {type(q).__name__}"
    spec = q.spec
    if not spec.number_format.is_integer or spec.bits != 4:
        return f"AWQ GEMM holds 4-bit integer weights only, this one is {spec.format}"
    if spec.granularity != "group" or spec.float_zero:
        return "AWQ needs group-wise scales and integer zero points"
    if q.g_idx is not None:
        return "AWQ has no group index; act-order weights cannot be written in it"
    if q.shape[0] % PACK:
        return f"AWQ packs 8 output channels per int32; {q.shape[0]} outputs is not a multiple"
    if not torch.equal(q.scale.half().float(), q.scale.float()):
        return "AWQ stores fp16 scales and these are not all fp16 values"
    zeros = q.zero.round() - q.spec.number_format.qmin
    if bool(((zeros < 0) | (zeros > 15)).any()):
        return "zero points outside 0..15 cannot be stored in AWQ's 4-bit qzeros"
    return None


def awq_tensors(name: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    """qweight, qzeros and scales of one quantised weight [N, K]."""
    problem = awq_problem(q)
    if problem:
        raise LowbitError(f"{name}: {problem}")
    shift = -q.spec.number_format.qmin            # 8 for a signed int4 grid, 0 for uint4
    levels = q.spec.number_format.decode(q.codes).to(torch.int64) + shift
    zeros = q.zero.round().to(torch.int64) + shift
    return {"qweight": pack_awq(levels.T.contiguous()), "qzeros": pack_awq(zeros.T.contiguous()),
            "scales": q.scale.T.contiguous().to(torch.float16)}


def quantized_from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                       group_size: int) -> QuantizedTensor:
    """The QuantizedTensor (uint4, asymmetric, fp16 scales, groups along the input) of AWQ tensors."""
    levels = unpack_awq(qweight).T.contiguous()     # [N, K]
    n_out, n_in = levels.shape
    if n_in % group_size or scales.shape != (n_in // group_size, n_out):
        raise LowbitError(f"AWQ tensors disagree: qweight is {n_in}x{n_out}, scales {tuple(scales.shape)}, "
                          f"group size {group_size}")
    spec = QuantSpec(IMPORT_SPEC_FORMAT, "group", group_size, False, "fp16")
    zero = unpack_awq(qzeros).T.float().contiguous()
    return QuantizedTensor(levels.to(torch.uint8), scales.T.float().contiguous(), zero, spec)


# ---------------------------------------------------------------------------------------------------
# Export

def _quantization_config(group_size: int, not_converted: list[str]) -> dict:
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4, "version": "gemm",
            "modules_to_not_convert": not_converted or None}


class AWQExporter(Exporter):
    """The AWQ GEMM layout: 4-bit group-quantised Linears, everything else at fp16."""

    name = "awq"
    requantize_with = "rtn-uint4-g128"

    def problem(self, weight) -> str | None:
        return awq_problem(weight)

    def model_problem(self, weights: dict) -> str | None:
        return mixed(weights, "group size", lambda q: q.spec.group_size, lambda g: f"groups of {g}")

    def write(self, model, weights, out, tokenizer=None, progress: bool = False, **_options) -> Path:
        if not weights:
            raise LowbitError("no quantised Linears to export: quantise with AWQ (or RTN int4 g128) first")
        head = output_head(model)
        if head in weights:
            raise LowbitError(f"{head}: the AWQ layout keeps the output head in float (transformers and vLLM build it "
                              f"unquantised); keep it in full precision (--skip {head}) or export gptq")
        group_size = one_value(weights, "AWQ", "group size", lambda q: q.spec.group_size)
        floats = {**float_tensors(model, weights, torch.float16), **biases(model, weights, torch.float16)}
        tensors = packed_tensors(floats, weights, _named_awq_tensors, "AWQ tensors", progress)
        qc = _quantization_config(group_size, sorted(float_linears(model)))
        return write_hf_folder(out, model, tensors, tokenizer, qc, torch.float16)


def _named_awq_tensors(name: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": t for k, t in awq_tensors(name, q).items()}


EXPORTER = register_exporter(AWQExporter())
export_awq = EXPORTER.export


# ---------------------------------------------------------------------------------------------------
# Import

def _read_awq_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LowbitError(f"not a model folder: {path} (no config.json)")
    try:
        qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as e:
        raise LowbitError(f"{cfg_file} is not valid JSON: {e}")
    if qc.get("quant_method") != "awq":
        raise LowbitError(f"{path} is not an AWQ checkpoint (quant_method {qc.get('quant_method')!r})")
    if qc.get("version", "gemm") != "gemm" or qc.get("bits", qc.get("w_bit", 4)) != 4:
        raise LowbitError(f"{path}: only 4-bit AWQ GEMM checkpoints are read (version {qc.get('version')!r}, "
                          f"bits {qc.get('bits', qc.get('w_bit'))!r})")
    return qc


def import_awq(path, progress: bool = False):
    """(model, tokenizer or None) from an AWQ GEMM folder, its 4-bit Linears as lowbit QuantLinear;
    progress: bars over the tensors read and unpacked, on stderr."""
    path = Path(path)
    qc = _read_awq_config(path)
    group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    tensors = read_tensors(path, progress)
    model = plain_model(path)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    with consumed(tensors, "unpacking AWQ", progress) as tick:
        for name in names:
            q = quantized_from_awq(tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.qzeros"),
                                   tensors.pop(f"{name}.scales"), group_size)
            bias = tensors.pop(f"{name}.bias", None)
            set_module(model, name, QuantLinear.from_quantized(q, None if bias is None else bias.float()))
            tick()
    return finish_import(model, tensors, path)


register_importer("awq", import_awq)
