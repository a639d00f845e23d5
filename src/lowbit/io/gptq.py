"""The Hugging Face GPTQ layout (AutoGPTQ / GPTQModel / transformers + optimum / vLLM), see
../shared/formats.md §4.

A model folder: config.json with a `quantization_config` (quant_method "gptq"), the same dict as
quantize_config.json, model.safetensors, and the tokenizer when given. Per quantised Linear `<m>`
(in = K, out = N, G groups):

    <m>.qweight  int32 [K*bits/32, N]   codes q in [0, 2^bits) packed along the input dim, LSB first
    <m>.qzeros   int32 [G, N*bits/32]   zero points packed along the output dim; "gptq" (v1) stores
                                        zero - 1, "gptq_v2" the zero itself
    <m>.scales   fp16  [G, N]
    <m>.g_idx    int32 [K]              group of each input column
    <m>.bias     fp16  [N]              when the Linear has one

and W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k]. Within a 32-bit word, and across
the words of a column for 3 bits, the codes form one little-endian bit stream: code i at bit i*bits.

A lowbit QuantizedTensor maps onto this exactly: q = level - qmin and zero = zero_point - qmin, where
level is the signed or unsigned integer the code decodes to. A symmetric grid becomes sym=True with
zero 2^(bits-1). Import reverses it bit for bit; quantize_config.json records the lowbit spec so that
even a choice the GPTQ layout cannot tell apart (uint4 symmetric vs int4) comes back as it was.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from lowbit._version import __version__
from lowbit.core import QuantizedTensor, QuantSpec, pack_bits, unpack_bits
from lowbit.errors import LowbitError
from lowbit.io import Exporter, register_exporter, register_importer
from lowbit.io import describe as describe_weight
from lowbit.io.hf_folder import (DTYPE_NAMES, DTYPES, WEIGHTS_FILE, biases, block_selection, finish_import,
                                 float_tensors, mixed, one_value, output_head, plain_model, read_tensors,
                                 write_hf_folder, writing_folder)
from lowbit.io.hf_folder import float_dtype as as_float_dtype
from lowbit.io.progress import consumed, packed_tensors
from lowbit.nn import QuantLinear
from lowbit.pipeline.arch import describe, sequential_groups
from lowbit.pipeline.loading import set_module

CONFIG_FILE = "quantize_config.json"
GPTQ_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


# ---------------------------------------------------------------------------------------------------
# int32 packing

def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [rows, cols] (each < 2^bits) -> int32 [rows*bits/32, cols], each column packed down its
    rows as a little-endian bit stream of 32-bit words (row i at bits [i*bits, (i+1)*bits))."""
    rows, cols = values.shape
    if rows * bits % 32:
        raise LowbitError(f"{rows} values of {bits} bits do not fill whole 32-bit words")
    stream = pack_bits(values.T.contiguous(), bits).reshape(cols, rows * bits // 32, 4).to(torch.int64)
    words = stream[..., 0] | stream[..., 1] << 8 | stream[..., 2] << 16 | stream[..., 3] << 24
    return _wrap_int32(words).T.contiguous()


def unpack_int32(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """The inverse of pack_int32: int32 [rows*bits/32, cols] -> uint8 codes [rows, cols]."""
    w = words.T.contiguous().to(torch.int64) & 0xFFFFFFFF
    stream = torch.stack([(w >> (8 * k)) & 0xFF for k in range(4)], -1).to(torch.uint8).reshape(-1)
    cols = words.shape[1]
    return unpack_bits(stream, bits, rows * cols).reshape(cols, rows).T.contiguous()


def _wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the int32 with the same bits."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


# ---------------------------------------------------------------------------------------------------
# One Linear

def gptq_problem(qt) -> str | None:
    """Why the GPTQ layout cannot hold `qt` exactly, or None when it can."""
    if not isinstance(qt, QuantizedTensor):
        return f"the GPTQ layout holds integer-grid weights, not {type(qt).__name__}"
    spec = qt.spec
    if not spec.number_format.is_integer or spec.bits not in GPTQ_BITS:
        return f"the GPTQ layout holds 2, 3, 4 or 8-bit integer grids, not {spec.format}"
    if spec.granularity not in ("group", "channel"):
        return f"the GPTQ layout holds per-group or per-channel scales, not per {spec.granularity}"
    if spec.float_zero:
        return "the GPTQ layout stores integer zero points, not float ones"
    n_out, n_in = qt.shape
    if n_out * spec.bits % 32 or n_in * spec.bits % 32:
        return f"a [{n_out}, {n_in}] weight of {spec.bits}-bit codes does not fill whole 32-bit words"
    if not torch.equal(qt.scale.half().float(), qt.scale.float()):
        return "the GPTQ layout stores fp16 scales and these are not all fp16 values (quantise with scale_dtype='fp16')"
    return None


def gptq_tensors(prefix: str, qt: QuantizedTensor, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of one QuantizedTensor [N, K]."""
    problem = gptq_problem(qt)
    if problem:
        raise LowbitError(f"{prefix}: {problem}")
    spec = qt.spec
    fmt, bits = spec.number_format, spec.bits
    n_out, n_in = qt.shape
    q = fmt.decode(qt.codes).to(torch.int64) - fmt.qmin                       # [N, K] in [0, 2^bits)
    zero = qt.zero.to(torch.int64) - fmt.qmin                                  # [N, G]
    if checkpoint_format == "gptq":
        if (zero < 1).any():
            raise LowbitError(f"{prefix}: a zero point of 0 cannot be stored in the v1 'gptq' format "
                              "(it stores zero - 1); use checkpoint_format='gptq_v2'")
        zero = zero - 1
    group = spec.group_size if spec.granularity == "group" else n_in
    g_idx = qt.g_idx if qt.g_idx is not None else torch.arange(n_in) // group
    return {
        f"{prefix}.qweight": pack_int32(q.T, bits),
        f"{prefix}.qzeros": pack_int32(zero, bits).T.contiguous(),
        f"{prefix}.scales": qt.scale.half().T.contiguous(),
        f"{prefix}.g_idx": g_idx.to(torch.int32).contiguous(),
    }


def quantized_from_gptq(tensors: dict[str, torch.Tensor], prefix: str, spec: QuantSpec, n_in: int,
                        checkpoint_format: str, dtype: torch.dtype = torch.float32,
                        keep_trivial_g_idx: bool = False) -> QuantizedTensor:
    """The QuantizedTensor [N, K] stored under `prefix` (the inverse of gptq_tensors)."""
    try:
        qweight, qzeros = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"]
        scales, g_idx = tensors[f"{prefix}.scales"], tensors[f"{prefix}.g_idx"]
    except KeyError as e:
        raise LowbitError(f"GPTQ checkpoint lacks {e.args[0]}")
    fmt, bits = spec.number_format, spec.bits
    n_out = scales.shape[1]
    if tuple(qweight.shape) != (n_in * bits // 32, n_out) or tuple(g_idx.shape) != (n_in,):
        raise LowbitError(f"{prefix}: qweight {tuple(qweight.shape)} / g_idx {tuple(g_idx.shape)} do not fit "
                          f"{bits}-bit codes of a [{n_out}, {n_in}] weight")
    q = unpack_int32(qweight, bits, n_in).T.to(torch.int64)                   # [N, K]
    zero = unpack_int32(qzeros.T.contiguous(), bits, n_out).T.to(torch.int64)  # [G, N]
    if checkpoint_format == "gptq":
        zero = zero + 1
        if (zero == 1 << bits).any():
            # v1 cannot hold a zero point of 0: writers that tried left all ones (0 - 1), which kernels
            # read as 2^bits. The quantiser meant 0, so that is what we read.
            warnings.warn(f"{prefix}: v1 zero points of 0 stored as -1 (a known GPTQ writer quirk); read as 0")
            zero = zero & ((1 << bits) - 1)
    level = q + fmt.qmin
    codes = (level & ((1 << bits) - 1)).to(torch.uint8)
    scale = scales.float().T.contiguous()
    if spec.symmetric:
        zero_point = torch.full_like(scale, spec.implied_zero)
        if not (zero == 1 << (bits - 1)).all():
            raise LowbitError(f"{prefix}: sym=True but the zero points are not all {1 << (bits - 1)}")
    else:
        zero_point = (zero + fmt.qmin).float().T.contiguous()
    group = spec.group_size if spec.granularity == "group" else n_in
    g = g_idx.to(torch.int32)
    trivial = torch.equal(g.long(), torch.arange(n_in) // group)
    return QuantizedTensor(codes, scale, zero_point, spec, dtype, None if trivial and not keep_trivial_g_idx else g)


# ---------------------------------------------------------------------------------------------------
# quantization_config

def quantization_config(qts: dict[str, QuantizedTensor], checkpoint_format: str, model=None) -> dict:
    """The dict transformers (config.json quantization_config), AutoGPTQ/GPTQModel (quantize_config.json)
    and vLLM read, plus a "lowbit" entry with what makes import exact. With the model, it says which
    Linears are stored quantised (module_selection)."""
    spec = one_value(qts, "the GPTQ layout", "scheme", lambda q: q.spec)
    desc_act = any(q.g_idx is not None for q in qts.values())
    dtype = one_value(qts, "the GPTQ layout", "compute dtype", lambda q: q.dtype)
    return {
        "quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size or -1,
        "desc_act": desc_act, "sym": spec.symmetric, "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32", "lm_head": "lm_head" in qts, "true_sequential": True, "static_groups": False,
        "damp_percent": 0.01, **(module_selection(model, qts) if model is not None else {}),
        "meta": {"quantizer": [f"lowbit:{__version__}"]},
        "lowbit": {"spec": spec.to_dict(), "dtype": DTYPE_NAMES.get(dtype, "float32"),
                   "g_idx": sorted(n for n, q in qts.items() if q.g_idx is not None)},
    }


def module_selection(model, quantized) -> dict:
    """What loaders read to build the right layers: `lm_head` (whether the output head is stored
    quantised: GPTQModel, vLLM); when some Linears of the blocks stay in float, `dynamic` excluding each
    ("-:" + an anchored regex of its name: GPTQModel, vLLM) and, when every block keeps the same ones,
    `block_name_to_quantize` with `modules_in_block_to_quantize` (transformers + optimum)."""
    head = output_head(model)
    out = {"lm_head": head is not None and head in quantized}
    path, per_block, kept = block_selection(model, quantized)
    if kept:
        out["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in kept}
        if all(names == per_block[0] for names in per_block):
            out["block_name_to_quantize"] = path
            out["modules_in_block_to_quantize"] = sequential_groups(describe(model), per_block[0])
    return out


def _choose_format(qts: dict[str, QuantizedTensor], requested: str | None) -> str:
    if requested is not None:
        if requested not in FORMATS:
            raise LowbitError(f"checkpoint_format must be one of {', '.join(FORMATS)}, got {requested!r}")
        return requested
    if any((q.zero - q.spec.number_format.qmin < 1).any() for q in qts.values()):
        warnings.warn("some zero points are 0, which the v1 'gptq' format cannot store; writing 'gptq_v2' "
                      "(true zero points), which GPTQModel reads but older loaders may not")
        return "gptq_v2"
    return "gptq"


# ---------------------------------------------------------------------------------------------------
# Export

class GPTQExporter(Exporter):
    """The HF GPTQ layout. checkpoint_format: "gptq" (v1, what every loader reads), "gptq_v2", or None:
    v1 unless a zero point of 0 needs v2. dtype: what the other tensors and biases are stored in (None:
    as held)."""

    name = "gptq"
    requantize_with = "rtn-int4-g128"

    def problem(self, weight) -> str | None:
        return gptq_problem(weight)

    def model_problem(self, weights: dict) -> str | None:
        return mixed(weights, "scheme", lambda q: q.spec, describe_spec) or mixed(weights, "compute dtype",
                                                                                   lambda q: q.dtype)

    def write(self, model, weights, out, tokenizer=None, checkpoint_format: str | None = None,
              dtype: str | None = "fp16", progress: bool = False, **_options) -> Path:
        float_dtype = as_float_dtype(dtype)
        if not weights:
            raise LowbitError("nothing to export in the GPTQ layout: no quantised Linear (quantise with gptq or rtn)")
        fmt = _choose_format(weights, checkpoint_format)
        qc = quantization_config(weights, fmt, model)
        floats = {**float_tensors(model, weights, float_dtype), **biases(model, weights, float_dtype)}
        tensors = packed_tensors(floats, weights, lambda name, qt: gptq_tensors(name, qt, fmt), "GPTQ tensors",
                                 progress)
        return write_hf_folder(out, model, tensors, tokenizer, qc, float_dtype, {CONFIG_FILE: qc})


def describe_spec(spec: QuantSpec) -> str:
    return describe_weight(type("W", (), {"spec": spec, "g_idx": None})())


def write_gptq_tensors(weights: dict[str, QuantizedTensor], out, checkpoint_format: str | None = None) -> Path:
    """Only the packed tensors and quantize_config.json of {name: QuantizedTensor} (no model around them)."""
    from safetensors.torch import save_file

    for name, qt in weights.items():
        problem = gptq_problem(qt)
        if problem:
            raise LowbitError(f"{name}: {problem}")
    fmt = _choose_format(weights, checkpoint_format)
    qc = quantization_config(weights, fmt)
    tensors = {k: v for name, qt in weights.items() for k, v in gptq_tensors(name, qt, fmt).items()}
    with writing_folder(out) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(qc, indent=2))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(out)


EXPORTER = register_exporter(GPTQExporter())


def export_gptq(model, out, tokenizer=None, checkpoint_format: str | None = None, dtype: str | None = "fp16",
                requantize: bool = False, progress: bool = False) -> Path:
    """Write a quantised model (or a dict {name: QuantizedTensor}) in the HF GPTQ layout; progress: a bar
    over the tensors on stderr."""
    if isinstance(model, dict):
        return write_gptq_tensors(model, out, checkpoint_format)
    return EXPORTER.export(model, out, tokenizer, requantize, checkpoint_format=checkpoint_format, dtype=dtype,
                           progress=progress)


# ---------------------------------------------------------------------------------------------------
# Import

def read_quantize_config(path: Path) -> dict:
    """quantize_config.json, or else config.json's quantization_config; checked to be GPTQ."""
    for name, pick in ((CONFIG_FILE, lambda d: d), ("config.json", lambda d: d.get("quantization_config"))):
        f = path / name
        if f.is_file():
            try:
                qc = pick(json.loads(f.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LowbitError(f"{f} is not valid JSON: {e}")
            if qc:
                break
    else:
        raise LowbitError(f"{path} has no quantize_config.json nor a quantization_config in config.json")
    if qc.get("quant_method", "gptq") != "gptq":
        raise LowbitError(f"{path} is not a GPTQ checkpoint (quant_method {qc.get('quant_method')!r})")
    if qc.get("bits") not in GPTQ_BITS:
        raise LowbitError(f"{path}: GPTQ bits must be one of {GPTQ_BITS}, got {qc.get('bits')!r}")
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if fmt not in FORMATS:
        raise LowbitError(f"{path}: checkpoint_format {fmt!r} is not supported (only {', '.join(FORMATS)})")
    if qc.get("pack_dtype", "int32") != "int32":
        raise LowbitError(f"{path}: pack_dtype {qc.get('pack_dtype')!r} is not supported (only int32)")
    return qc


def _spec_of(qc: dict, n_in: int) -> QuantSpec:
    """The lowbit spec recorded by lowbit, or the one a foreign checkpoint implies."""
    own = (qc.get("lowbit") or {}).get("spec")
    if own:
        return QuantSpec.from_dict(own)
    bits, sym = qc["bits"], qc.get("sym", True)
    group = qc.get("group_size", -1)
    fmt = f"int{bits}" if sym else f"uint{bits}"
    if group in (-1, None) or group >= n_in:
        return QuantSpec(fmt, "channel", None, sym, "fp16")
    return QuantSpec(fmt, "group", group, sym, "fp16")


def read_gptq(path, progress: bool = False) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor], dict]:
    """({module: QuantizedTensor}, {every other tensor, biases included}, quantization config) of a
    GPTQ folder. progress: bars over the tensors read and unpacked, on stderr."""
    path = Path(path)
    qc = read_quantize_config(path)
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    tensors = read_tensors(path, progress)
    own = qc.get("lowbit") or {}
    dtype = DTYPES.get({"float16": "fp16", "bfloat16": "bf16"}.get(own.get("dtype"), "fp32"))
    with_g_idx = set(own.get("g_idx", []))
    qts = {}
    names = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    with consumed(tensors, "unpacking GPTQ", progress) as tick:
        for name in names:
            n_in = tensors[f"{name}.g_idx"].shape[0] if f"{name}.g_idx" in tensors else 0
            qts[name] = quantized_from_gptq(tensors, name, _spec_of(qc, n_in), n_in, fmt, dtype, name in with_g_idx)
            for suffix in ("qweight", "qzeros", "scales", "g_idx"):
                tensors.pop(f"{name}.{suffix}", None)
            tick()
    if not qts:
        raise LowbitError(f"{path} holds no GPTQ-packed Linear (no .qweight tensors)")
    return qts, tensors, qc


def import_gptq(path, progress: bool = False):
    """(model, tokenizer or None) from a GPTQ folder, its quantised Linears as QuantLinear."""
    path = Path(path)
    qts, tensors, _ = read_gptq(path, progress)
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} has no config.json: use read_gptq() for the tensors alone")
    model = plain_model(path)
    for name, qt in qts.items():
        bias = tensors.pop(f"{name}.bias", None)
        set_module(model, name, QuantLinear.from_quantized(qt, None if bias is None else bias.float()))
    return finish_import(model, tensors, path)


register_importer("gptq", import_gptq)
