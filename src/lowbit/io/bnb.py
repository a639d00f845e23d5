"""The bitsandbytes 4-bit serialisation that transformers reads (a pre-quantised bnb-4bit checkpoint).

A model folder: config.json with a `quantization_config` (quant_method "bitsandbytes", load_in_4bit),
model.safetensors, and the tokenizer when given. Per 4-bit Linear `<m>`, the keys bnb's Linear4bit
state_dict writes (see ../shared/formats.md §6):

    <m>.weight                                  uint8 [ceil(n/2), 1]  codes, first in the high nibble
    <m>.weight.absmax                           float32 [blocks], or uint8 [blocks] when double-quantised
    <m>.weight.quant_map                        float32 [16]
    <m>.weight.nested_absmax / nested_quant_map float32 [ceil(blocks/256)] / [256] (double quantisation)
    <m>.weight.quant_state.bitsandbytes__<nf4|fp4>  uint8: JSON bytes of quant_type, blocksize, dtype,
                                                shape (+ nested_blocksize, nested_dtype, nested_offset)

Every other tensor is written as the model holds it. Export translates Quantized4bit weights (NF4/FP4
quantised by lowbit.methods.nf4) and accepts nothing else; import rebuilds them bit for bit, so a round
trip changes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io import Exporter, register_exporter, register_importer
from lowbit.io.hf_folder import (finish_import, float_linears, float_tensors, mixed, plain_model, read_tensors,
                                 write_hf_folder)
from lowbit.io.progress import consumed, packed_tensors
from lowbit.nn.linear4bit import Linear4bit
from lowbit.pipeline.loading import set_module
from lowbit.weights.bnb4 import Quantized4bit, code_table, dynamic_map

QUANT_STATE_PREFIX = "weight.quant_state.bitsandbytes__"
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES_BY_NAME = {v: k for k, v in TORCH_DTYPE_NAMES.items()}


# ---------------------------------------------------------------------------------------------------
# Tensors of one Linear

def quant_state_json(q: Quantized4bit) -> bytes:
    """The non-tensor fields as bnb's QuantState.as_dict(packed=True) serialises them (same key order)."""
    fields = {"quant_type": q.quant_type, "blocksize": q.block_size, "dtype": TORCH_DTYPE_NAMES[q.dtype],
              "shape": list(q.shape)}
    if q.double_quant:
        fields.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(q.nested_offset))
    return json.dumps(fields).encode("utf-8")


def bnb_linear_tensors(prefix: str, q: Quantized4bit) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.weight": q.packed.reshape(-1, 1), f"{prefix}.weight.absmax": q.absmax,
           f"{prefix}.weight.quant_map": code_table(q.quant_type)}
    if q.double_quant:
        out[f"{prefix}.weight.nested_absmax"] = q.nested_absmax
        out[f"{prefix}.weight.nested_quant_map"] = dynamic_map()
    payload = torch.frombuffer(bytearray(quant_state_json(q)), dtype=torch.uint8)
    out[f"{prefix}.{QUANT_STATE_PREFIX}{q.quant_type}"] = payload
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def quantized_from_bnb(tensors: dict[str, torch.Tensor], fields: dict, where: str) -> Quantized4bit:
    """A Quantized4bit from one Linear's bnb tensors (keys without the module prefix) and its JSON fields."""
    quant_type = fields.get("quant_type")
    if quant_type not in ("nf4", "fp4"):
        raise LowbitError(f"{where}: unsupported bnb quant_type {quant_type!r}")
    if "quant_map" in tensors and not torch.equal(tensors["quant_map"].float(), code_table(quant_type)):
        raise LowbitError(f"{where}: quant_map is not bitsandbytes' {quant_type} table")
    nested = "nested_absmax" in tensors
    if nested and not torch.equal(tensors["nested_quant_map"].float(), dynamic_map()):
        raise LowbitError(f"{where}: nested_quant_map is not bitsandbytes' dynamic 8-bit map")
    if nested and fields.get("nested_blocksize") != 256:
        raise LowbitError(f"{where}: nested block size {fields.get('nested_blocksize')} (only 256 is supported)")
    weight = tensors["weight"]
    packed = weight.reshape(-1).view(torch.uint8) if weight.dtype != torch.uint8 else weight.reshape(-1)
    shape = torch.Size(fields["shape"])
    if packed.numel() != (shape.numel() + 1) // 2:
        raise LowbitError(f"{where}: weight holds {packed.numel()} bytes, shape {list(shape)} needs "
                          f"{(shape.numel() + 1) // 2}")
    return Quantized4bit(
        packed.clone(), tensors["absmax"].clone(), shape, int(fields["blocksize"]), quant_type,
        DTYPES_BY_NAME.get(fields.get("dtype"), torch.float32),
        tensors["nested_absmax"].float().clone() if nested else None,
        torch.tensor(float(fields["nested_offset"]), dtype=torch.float32) if nested else None)


# ---------------------------------------------------------------------------------------------------
# Whole models

MODEL_SETTINGS = {"quant type": lambda q: q.quant_type, "double quantisation setting": lambda q: q.double_quant}


def compute_dtype(model: nn.Module, weights: dict) -> torch.dtype:
    """The compute dtype the model's 4-bit Linears run in (bf16, bnb's default, for re-rounded weights)."""
    dtypes = {getattr(model.get_submodule(n), "compute_dtype", torch.bfloat16) for n in weights}
    return dtypes.pop() if len(dtypes) == 1 else torch.bfloat16


def quantization_config(weights: dict[str, Quantized4bit], kept: list[str], dtype: torch.dtype) -> dict:
    """transformers' BitsAndBytesConfig as a dict; Linears left in float are listed as skipped, and the list
    is written even when empty (None would make transformers skip the output head, quantised or not)."""
    first = next(iter(weights.values()))
    return {
        "quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False,
        "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type, "bnb_4bit_use_double_quant": first.double_quant,
        "bnb_4bit_compute_dtype": TORCH_DTYPE_NAMES[dtype],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": 6.0, "llm_int8_skip_modules": kept,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
    }


class BnbExporter(Exporter):
    """bitsandbytes' pre-quantised 4-bit folder (what transformers loads with load_in_4bit)."""

    name = "bnb"
    requantize_with = "nf4"

    def problem(self, weight) -> str | None:
        return None if isinstance(weight, Quantized4bit) else "bnb holds NF4/FP4 blockwise weights only"

    def model_problem(self, weights: dict) -> str | None:
        return next((p for what, value in MODEL_SETTINGS.items() if (p := mixed(weights, what, value))), None)

    def write(self, model, weights, out, tokenizer=None, progress: bool = False, **_options) -> Path:
        if not weights:
            raise LowbitError("the model holds no NF4/FP4 Linear to export in the bnb format (quantise with nf4 or fp4)")
        if any(type(m).__name__ == "LoraLinear" for m in model.modules()):
            raise LowbitError("the model carries LoRA adapters; export the base without them "
                              "(adapters are saved on their own as a PEFT folder)")
        modules = {n: model.get_submodule(n) for n in weights}
        floats = {**float_tensors(model, weights), **{f"{n}.bias": m.bias.detach().contiguous().clone()
                                                      for n, m in modules.items() if m.bias is not None}}
        tensors = packed_tensors(floats, weights, bnb_linear_tensors, "bnb tensors", progress)
        qc = quantization_config(weights, float_linears(model), compute_dtype(model, weights))
        return write_hf_folder(out, model, tensors, tokenizer, qc)


EXPORTER = register_exporter(BnbExporter())
export_bnb = EXPORTER.export


def _read_bnb_config(path: Path) -> dict:
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read {path / 'config.json'}: {e}")
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise LowbitError(f"{path} is not a bitsandbytes 4-bit checkpoint (quantization_config says otherwise)")
    return qc


def _group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {weight, absmax, ..., quant_state JSON}} for every bnb 4-bit Linear in the file."""
    names = [k.split(f".{QUANT_STATE_PREFIX}")[0] for k in tensors if f".{QUANT_STATE_PREFIX}" in k]
    groups = {}
    for name in names:
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.weight")}
        groups[name] = {k.removeprefix("weight.") if k != "weight" else k: v for k, v in own.items()}
    return groups


def import_bnb(path, progress: bool = False):
    """(model, tokenizer or None) from a pre-quantised bnb-4bit folder, its 4-bit Linears as Linear4bit;
    progress: bars over the tensors read and unpacked, on stderr."""
    path = Path(path)
    qc = _read_bnb_config(path)
    compute_dtype = DTYPES_BY_NAME.get(qc.get("bnb_4bit_compute_dtype") or "float32", torch.float32)
    tensors = read_tensors(path, progress)
    model = plain_model(path)
    with consumed(tensors, "unpacking bnb", progress) as tick:
        for name, own in _group_by_module(tensors).items():
            set_module(model, name, _linear4bit(tensors, name, own, f"{path.name}: {name}", compute_dtype))
            tick()
    return finish_import(model, tensors, path)


def _linear4bit(tensors: dict, name: str, own: dict, where: str, compute_dtype: torch.dtype) -> Linear4bit:
    """The Linear4bit stored under `name` (`own`: its weight tensors by suffix), its tensors and bias taken out
    of `tensors`."""
    qs_key = next(k for k in own if k.startswith("quant_state."))
    fields = json.loads(bytes(own.pop(qs_key).tolist()).decode("utf-8"))
    q = quantized_from_bnb(own, fields, where)
    bias = tensors.pop(f"{name}.bias", None)
    for k in [k for k in tensors if k.startswith(f"{name}.weight")]:
        del tensors[k]
    return Linear4bit.from_quantized(q, bias, compute_dtype)


register_importer("bnb", import_bnb)

__all__ = ["export_bnb", "import_bnb", "bnb_linear_tensors", "quantized_from_bnb", "quant_state_json",
           "quantization_config"]
