"""The compressed-tensors checkpoint layout (vLLM's preferred format; transformers reads it too).

A model folder whose config.json carries a `quantization_config` with quant_method "compressed-tensors":
`config_groups` (each a QuantizationScheme: targets, weights args, input_activations args, format), an
`ignore` list, a global `format`, quantization_status "compressed". Per quantised Linear `<m>`
(compressed-tensors 0.x, vLLM's compressed_tensors schemes):

    pack-quantized   <m>.weight_packed int32 [N, ceil(K*b/32)]  b-bit values + 2^(b-1), 32 consecutive
                                                                 values in b words, little-endian bits
                     <m>.weight_scale  [N, G] (group), [N, 1] (channel)
                     <m>.weight_zero_point int32 [ceil(N*b/32), G] (asymmetric; packed along N)
                     <m>.weight_shape  int64 [2]
    int-quantized    <m>.weight int8 [N, K], <m>.weight_scale [N, 1]; <m>.input_scale [1] when the
                     activations are static per tensor (W8A8; dynamic per token stores nothing)
    float-quantized  <m>.weight float8_e4m3fn [N, K], <m>.weight_scale [N, 1] or [1]; with FP8 input
                     activations (W8A8-FP8) input args of type float, per token (dynamic) or per tensor
                     with <m>.input_scale [1]
    nvfp4-pack-quantized  NVFP4: <m>.weight_packed uint8 [N, K/2] (two E2M1 codes a byte, the even
                     column in the low nibble), <m>.weight_scale float8_e4m3fn [N, K/16] (s), and
                     <m>.weight_global_scale float32 [1] (G, a divisor: w = e2m1 * s / G); strategy
                     "tensor_group", group 16
    mxfp4-pack-quantized  MXFP4: weight_packed as NVFP4's, weight_scale uint8 [N, K/32] (E8M0 codes,
                     2^(code - 127)); strategy "group", group 32
    mxfp6-pack-quantized  MXFP6 E2M3: weight_packed uint8 [N, 3K/4] (four 6-bit codes in three bytes,
                     little-endian), weight_scale as MXFP4's
    mxfp8-quantized  MXFP8 E4M3: <m>.weight float8_e4m3fn [N, K], weight_scale as MXFP4's

With activations in the weight's block format (BlockActWeight: W4A4 NVFP4 / MXFP4, W8A8 MXFP8, W6A6
MXFP6) the input args are the presets' (compressed_tensors.quantization.quant_scheme NVFP4, MXFP4, MXFP8):
NVFP4 strategy "tensor_group", group 16, dynamic "local" (block scales on the fly) under the static
<m>.input_global_scale float32 [1] (G_x, a divisor); MX strategy "group", group 32, dynamic True.

and w = (q - zero) * scale, q and zero in the *signed* range [-2^(b-1), 2^(b-1)). The MX element codes
are the formats' bit patterns (OCP MX v1.0), as lowbit holds them; MXINT8 is an int8 group-32 grid with
power-of-two scales, written pack-quantized. compressed-tensors 0.20 defines no MXFP6 E3M2, MXFP8 E5M2
or MXINT8 format of its own. Scales are written as
float32 so that compressed-tensors' decompression (which computes in the scale's dtype) gives exactly
lowbit's values; loaders cast them to the model's dtype, losslessly for fp16/bf16 scales.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from lowbit._version import __version__
from lowbit.core import QuantizedTensor, QuantSpec, mx, pack_bits, unpack_bits
from lowbit.errors import LowbitError
from lowbit.io import Exporter, register_exporter, register_importer
from lowbit.io.hf_folder import DTYPES, finish_import, float_tensors, plain_model, read_tensors, write_hf_folder
from lowbit.io.progress import consumed, packed_tensors
from lowbit.nn import module_for
from lowbit.pipeline.loading import set_module
from lowbit.weights import ActQuantWeight, BlockActWeight, FP8ActWeight
from lowbit.io.ct_microscaling import (BLOCK_FORMATS, BLOCK_SPECS, FLOAT_FORMATS, MXFP4, MXFP6, MXFP8, NVFP4, SCALE_DTYPES,  # noqa: F401
                                      block_act_from_tensors, block_from_tensors, block_input_args, block_weight_args, block_tensors, pack_fp4, pack_fp6,
                                      unpack_fp4, unpack_fp6)

QUANT_METHOD = "compressed-tensors"
PACKED, INT, FLOAT = "pack-quantized", "int-quantized", "float-quantized"


# ---------------------------------------------------------------------------------------------------
# Which format holds a weight

def weight_format(w) -> str | None:
    """The compressed-tensors format that stores `w` exactly, or None."""
    if isinstance(w, ActQuantWeight):
        return INT
    if isinstance(w, FP8ActWeight):
        return FLOAT if w.weight.spec.format in FLOAT_FORMATS else None
    if isinstance(w, BlockActWeight):
        return weight_format(w.weight)
    if not isinstance(w, QuantizedTensor) or w.g_idx is not None or w.spec.float_zero:
        return None
    spec = w.spec
    if spec.scale_dtype in (mx.MX_SCALE, mx.NV_SCALE) and not spec.number_format.is_integer:
        return BLOCK_FORMATS.get((spec.format, spec.group_size, spec.scale_dtype))
    if spec.granularity not in ("channel", "group", "tensor"):
        return None
    if spec.number_format.is_integer and 2 <= spec.bits <= 8:
        return PACKED
    if spec.format in FLOAT_FORMATS and spec.granularity in ("channel", "tensor"):
        return FLOAT
    return None


def problem(w) -> str | None:
    if weight_format(w) is not None:
        return None
    if isinstance(w, QuantizedTensor) and w.g_idx is not None:
        # compressed-tensors 0.20 removed actorder="group" (a weight_g_idx per column); "weight" is static groups
        return ("compressed-tensors no longer takes a group index (act-order with dynamic groups); use static "
                "groups (the gptq default)")
    return ("compressed-tensors holds 2..8-bit integer grids per tensor/channel/group, FP8 E4M3 per tensor/"
            "channel (with or without FP8 activations), W8A8 int8, NVFP4, MXFP4, MXFP6 E2M3, MXFP8 E4M3 and "
            "MXINT8 (not MXFP6 E3M2 or MXFP8 E5M2)")


# ---------------------------------------------------------------------------------------------------
# QuantSpec <-> compressed-tensors QuantizationArgs

def weight_args(spec: QuantSpec) -> dict:
    if spec.scale_dtype in SCALE_DTYPES and not spec.number_format.is_integer:   # NVFP4 / MX floats
        return block_weight_args(spec)
    is_int = spec.number_format.is_integer
    args = {"num_bits": spec.bits if is_int else FLOAT_FORMATS[spec.format][1], "type": "int" if is_int else "float",
            "symmetric": spec.symmetric, "strategy": spec.granularity, "group_size": spec.group_size,
            "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}
    return args


def input_args(w) -> dict | None:
    if isinstance(w, BlockActWeight):
        return block_input_args(w.weight.spec)
    if not isinstance(w, (ActQuantWeight, FP8ActWeight)):
        return None
    dynamic = w.activation == "token"
    kind = "float" if isinstance(w, FP8ActWeight) else "int"
    return {"num_bits": 8, "type": kind, "symmetric": True, "strategy": w.activation, "dynamic": dynamic,
            "group_size": None, "actorder": None, "observer": None if dynamic else "minmax", "block_structure": None}


def spec_from_args(args: dict, scale: torch.Tensor, fmt: str | None = None) -> QuantSpec:
    """The lowbit scheme a weights' QuantizationArgs describe (scale dtype: the narrowest that holds them);
    `fmt`, the config group's format, names the microscaling ones."""
    if fmt in BLOCK_SPECS:
        element, block, rule = BLOCK_SPECS[fmt]
        if args.get("group_size") != block:
            raise LowbitError(f"{fmt} weights come in groups of {block}, this config says {args.get('group_size')}")
        return QuantSpec(element, "group", block, True, rule)
    bits, sym, strategy = int(args.get("num_bits", 8)), bool(args.get("symmetric", True)), args.get("strategy")
    if args.get("type", "int") == "float":
        if bits != 8:
            raise LowbitError(f"compressed-tensors float weights of {bits} bits are not supported here (FP8 only)")
        fmt = "fp8_e4m3"
    else:
        fmt = f"int{bits}" if sym else f"uint{bits}"
    if strategy not in ("channel", "group", "tensor"):
        raise LowbitError(f"compressed-tensors weight strategy {strategy!r} is not supported here")
    group = int(args["group_size"]) if strategy == "group" else None
    return QuantSpec(fmt, strategy, group, sym, _scale_dtype(scale))


def _scale_dtype(scale: torch.Tensor) -> str:
    s = scale.float()
    for name in ("fp16", "bf16"):
        if torch.equal(s.to(DTYPES[name]).float(), s):
            return name
    return "fp32"


# ---------------------------------------------------------------------------------------------------
# Tensors of one Linear

def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit values [R, C] -> int32 [R, ceil(C*b/32)]: each row a little-endian bit stream."""
    rows, cols = values.shape
    padded = -(-cols // 32) * 32
    v = torch.nn.functional.pad(values.to(torch.int64), (0, padded - cols))
    words = pack_bits(v, bits).view(torch.int32).reshape(rows, padded * bits // 32)
    return words[:, : -(-cols * bits // 32)].contiguous()


def unpack_rows(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows = words.shape[0]
    padded = -(-cols // 32) * 32
    full = torch.nn.functional.pad(words, (0, padded * bits // 32 - words.shape[1]))
    return unpack_bits(full.contiguous().view(torch.uint8), bits, rows * padded).reshape(rows, padded)[:, :cols]


def _offset(spec: QuantSpec) -> int:
    """What turns a level of the grid into compressed-tensors' stored unsigned value (q + 2^(b-1))."""
    return (1 << (spec.bits - 1)) if spec.number_format.signed else 0


def module_tensors(name: str, w) -> dict[str, torch.Tensor]:
    fmt = weight_format(w)
    if isinstance(w, BlockActWeight):
        out = block_tensors(name, w.weight, fmt)
        if w.input_global_scale is not None:
            out[f"{name}.input_global_scale"] = torch.tensor([float(w.input_global_scale)], dtype=torch.float32)
        return out
    if fmt in BLOCK_SPECS:
        return block_tensors(name, w, fmt)
    q = w.weight if isinstance(w, (ActQuantWeight, FP8ActWeight)) else w
    scale = q.scale.float().reshape(q.shape[0], -1) if q.spec.granularity != "tensor" else q.scale.reshape(1)
    out = {f"{name}.weight_scale": scale.contiguous()}
    levels = q.spec.number_format.decode(q.codes)
    if fmt == PACKED:
        spec = q.spec
        out[f"{name}.weight_packed"] = pack_rows(levels.to(torch.int64) + _offset(spec), spec.bits)
        out[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
        if not spec.symmetric:
            zero = q.zero.to(torch.int64) + _offset(spec)
            out[f"{name}.weight_zero_point"] = pack_rows(zero.T.contiguous(), spec.bits).T.contiguous()
    elif fmt == INT:
        out[f"{name}.weight"] = levels.to(torch.int8).contiguous()
        if w.activation == "tensor":
            out[f"{name}.input_scale"] = torch.tensor([float(w.input_scale)], dtype=torch.float32)
    else:
        out[f"{name}.weight"] = q.codes.view(FLOAT_FORMATS[q.spec.format][0]).contiguous()
        if isinstance(w, FP8ActWeight) and w.activation == "tensor":
            out[f"{name}.input_scale"] = torch.tensor([float(w.input_scale)], dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------------
# quantization_config

def _scheme(w) -> dict:
    q = w.weight if isinstance(w, (ActQuantWeight, FP8ActWeight, BlockActWeight)) else w
    return {"weights": weight_args(q.spec), "input_activations": input_args(w), "output_activations": None,
            "format": weight_format(w)}


def quantization_config(weights: dict, ignore: list[str]) -> dict:
    """One config group per distinct scheme; targets are the Linears' names ("Linear" when one group)."""
    groups: dict[str, dict] = {}
    for name, w in weights.items():
        key = json.dumps(_scheme(w), sort_keys=True)
        groups.setdefault(key, {**_scheme(w), "targets": []})["targets"].append(name)
    if len(groups) == 1:
        next(iter(groups.values()))["targets"] = ["Linear"]
    formats = {g["format"] for g in groups.values()}
    return {"quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
            "ignore": ignore, "quantization_status": "compressed", "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
            "version": f"lowbit-{__version__}"}


class CompressedTensorsExporter(Exporter):
    """compressed-tensors: pack-quantized int grids (weight-only), int-quantized W8A8, float-quantized
    FP8 (weight-only or W8A8-FP8). dtype: what the unquantised tensors are stored in ("bf16", "fp16", "fp32" or None: as held)."""

    name = "compressed-tensors"
    requantize_with = "rtn-int4-g128"

    def problem(self, weight) -> str | None:
        return problem(weight)

    def write(self, model, weights, out, tokenizer=None, dtype: str | None = "bf16", progress: bool = False,
              **_options) -> Path:
        if not weights:
            raise LowbitError("nothing to export in compressed-tensors: the model holds no quantised Linear")
        conv1d = [n for n in weights if getattr(model.get_submodule(n), "hf_conv1d", False)]
        if conv1d:
            # transformers builds these as Conv1D, which compressed-tensors never quantises: the model would
            # load with them randomly initialised (transformers 5.24, compressed-tensors 0.20; tests/io/test_paths.py)
            raise LowbitError(f"compressed-tensors: {conv1d[0]} and {len(conv1d) - 1} more are Conv1D layers in "
                              f"transformers' {model.config.model_type}, which compressed-tensors does not quantise; "
                              "export gptq, awq or bnb")
        float_dtype = DTYPES.get(dtype) if dtype else None
        tensors = packed_tensors(float_tensors(model, weights, float_dtype), weights,
                                 lambda name, w: {**module_tensors(name, w), **_bias(model, name, float_dtype)},
                                 "compressed-tensors tensors", progress)
        ignore = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
        return write_hf_folder(out, model, tensors, tokenizer, quantization_config(weights, ignore), float_dtype)


def _bias(model: nn.Module, name: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    bias = getattr(model.get_submodule(name), "bias", None)
    return {} if bias is None else {f"{name}.bias": bias.detach().to(dtype or bias.dtype).contiguous().clone()}


register_exporter(CompressedTensorsExporter())


# ---------------------------------------------------------------------------------------------------
# Import

def read_quantization_config(path: Path) -> dict:
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read {path / 'config.json'}: {e}")
    if qc.get("quant_method") != QUANT_METHOD:
        raise LowbitError(f"{path} is not a compressed-tensors checkpoint (quant_method {qc.get('quant_method')!r})")
    if not isinstance(qc.get("config_groups"), dict) or not qc["config_groups"]:
        raise LowbitError(f"{path}: compressed-tensors config has no config_groups")
    return qc


def _matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


def scheme_of(qc: dict, name: str, module: nn.Module) -> dict | None:
    """The config group whose targets name this module (None when ignored or untargeted)."""
    if any(_matches(t, name, module) for t in qc.get("ignore") or []):
        return None
    for group in qc["config_groups"].values():
        if any(_matches(t, name, module) for t in group.get("targets", [])):
            return group
    return None


def _get(tensors: dict, key: str) -> torch.Tensor:
    if key not in tensors:
        raise LowbitError(f"compressed-tensors checkpoint lacks {key}")
    return tensors.pop(key)


def quantized_from_tensors(tensors: dict, name: str, group: dict):
    """The lowbit weight stored under `name` in the format its config group names (consumes its tensors)."""
    args, inputs = group.get("weights") or {}, group.get("input_activations")
    fmt = group.get("format") or (PACKED if f"{name}.weight_packed" in tensors else None)
    if f"{name}.weight_g_idx" in tensors:
        raise LowbitError(f"{name}: act-order group indices (weight_g_idx) are not supported here")
    if fmt in BLOCK_SPECS:
        q = block_from_tensors(tensors, name, spec_from_args(args, None, fmt), fmt)
        return block_act_from_tensors(tensors, name, q, inputs) if inputs else q
    scale = _get(tensors, f"{name}.weight_scale").float()
    spec = spec_from_args(args, scale)
    if fmt == PACKED:
        rows, cols = (int(x) for x in _get(tensors, f"{name}.weight_shape").tolist())
        levels = unpack_rows(_get(tensors, f"{name}.weight_packed"), spec.bits, cols).to(torch.int64) - _offset(spec)
        zero = torch.full((rows, scale.numel() // rows or 1), spec.implied_zero)
        if not spec.symmetric:
            packed_zero = _get(tensors, f"{name}.weight_zero_point")
            zero = unpack_rows(packed_zero.T.contiguous(), spec.bits, rows).T.float() - _offset(spec)
    else:
        stored = _get(tensors, f"{name}.weight")
        rows, cols = stored.shape
        levels = stored.view(torch.uint8) if fmt == FLOAT else stored.to(torch.int64)
        zero = torch.zeros(rows if spec.granularity != "tensor" else 1, 1)
    codes = levels if fmt == FLOAT else spec.number_format.encode(levels.float())
    scale = scale.reshape(zero.shape) if spec.granularity != "tensor" else scale.reshape(1, 1)
    q = QuantizedTensor(codes.reshape(rows, cols), scale, zero.float().reshape(scale.shape), spec)
    if inputs:
        static = not inputs.get("dynamic", False)
        input_scale = float(_get(tensors, f"{name}.input_scale").reshape(-1)[0]) if static else None
        kind = FP8ActWeight if inputs.get("type") == "float" else ActQuantWeight
        return kind(q, "tensor" if static else "token", input_scale)
    return q


def import_compressed_tensors(path, progress: bool = False):
    """(model, tokenizer or None) from a compressed-tensors folder, its quantised Linears as lowbit modules;
    progress: bars over the tensors read and unpacked, on stderr."""
    path = Path(path)
    qc = read_quantization_config(path)
    tensors = read_tensors(path, progress)
    model = plain_model(path)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    stored = [n for n, m in linears.items() if scheme_of(qc, n, m) is not None and f"{n}.weight_scale" in tensors]
    with consumed(tensors, "unpacking compressed-tensors", progress) as tick:
        for name in stored:
            w = quantized_from_tensors(tensors, name, scheme_of(qc, name, linears[name]))
            bias = tensors.pop(f"{name}.bias", None)
            set_module(model, name, module_for(w, None if bias is None else bias.float()))
            tick()
    return finish_import(model, tensors, path)


register_importer(QUANT_METHOD, import_compressed_tensors)
