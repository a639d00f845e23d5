"""compressed-tensors' microscaling layouts (NVFP4, MXFP4, MXFP6 E2M3, MXFP8 E4M3) for io/compressed_tensors.py:
packing of the element codes, E4M3 / E8M0 block scales, NVFP4's global scales, and the W4A4 input args.
Layouts as compressed-tensors 0.20's compressors write them (compressors/nvfp4, mxfp4, mxfp6, mxfp8)."""
from __future__ import annotations

import torch

from lowbit.core import QuantizedTensor, QuantSpec, mx, pack_bits, unpack_bits
from lowbit.errors import LowbitError
from lowbit.weights import BlockActWeight

NVFP4, MXFP4, MXFP6, MXFP8 = "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized"
FLOAT_FORMATS = {"fp8_e4m3": (torch.float8_e4m3fn, 8)}
# (element format, block, scale rule) -> the compressed-tensors format of a microscaling weight
BLOCK_FORMATS = {("fp4_e2m1", 16, mx.NV_SCALE): NVFP4, ("fp4_e2m1", 32, mx.MX_SCALE): MXFP4,
                 ("fp6_e2m3", 32, mx.MX_SCALE): MXFP6, ("fp8_e4m3", 32, mx.MX_SCALE): MXFP8}
BLOCK_SPECS = {f: k for k, f in BLOCK_FORMATS.items()}
SCALE_DTYPES = {mx.NV_SCALE: "torch.float8_e4m3fn", mx.MX_SCALE: "torch.uint8"}


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codes [R, C] -> uint8 [R, C*b/8]: each row a little-endian bit stream (core packing), as
    compressed-tensors' FP4 (low nibble first) and FP6 (four codes in a 24-bit word) layouts both are; the
    block sizes (16, 32) keep every row byte-aligned."""
    rows = codes.shape[0]
    return pack_bits(codes, bits).reshape(rows, -1)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    rows, nbytes = packed.shape
    return unpack_bits(packed.contiguous(), bits, rows * nbytes * 8 // bits).reshape(rows, -1)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [R, C] (C even) -> uint8 [R, C/2], the even column in the low nibble."""
    return _pack_rows(codes, 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    return _unpack_rows(packed, 4)


def pack_fp6(codes: torch.Tensor) -> torch.Tensor:
    """6-bit codes [R, C] (C a multiple of 4) -> uint8 [R, 3C/4]: four codes in a little-endian 24-bit word."""
    return _pack_rows(codes, 6)


def unpack_fp6(packed: torch.Tensor) -> torch.Tensor:
    return _unpack_rows(packed, 6)


def block_tensors(name: str, q: QuantizedTensor, fmt: str) -> dict[str, torch.Tensor]:
    """NVFP4 / MX weights: packed element codes, E4M3 or E8M0 block scales (and NVFP4's global scale)."""
    rows = q.shape[0]
    scale = q.scale.reshape(rows, -1)
    out = {}
    if fmt == NVFP4:
        g = q.extras["global_scale"].float().reshape(1)
        out[f"{name}.weight_scale"] = mx.nv_recover_block_scales(scale, g).contiguous()
        out[f"{name}.weight_global_scale"] = g.clone()
    else:
        out[f"{name}.weight_scale"] = mx.mx_scale_codes(scale, q.spec.number_format).contiguous()
    if fmt == MXFP8:
        out[f"{name}.weight"] = q.codes.view(torch.float8_e4m3fn).contiguous()
    else:
        out[f"{name}.weight_packed"] = pack_fp6(q.codes) if fmt == MXFP6 else pack_fp4(q.codes)
    return out



def block_from_tensors(tensors: dict, name: str, spec: QuantSpec, fmt: str) -> QuantizedTensor:
    """An NVFP4 / MX weight from its stored tensors: the effective scale s / G (NVFP4) or 2^(code - 127)."""
    stored = _get(tensors, f"{name}.weight_scale")
    if fmt == MXFP8:
        codes = _get(tensors, f"{name}.weight").view(torch.uint8)
    else:
        packed = _get(tensors, f"{name}.weight_packed")
        codes = unpack_fp6(packed) if fmt == MXFP6 else unpack_fp4(packed)
    extras = {}
    if fmt == NVFP4:
        g = _get(tensors, f"{name}.weight_global_scale").float().reshape(1)
        scale = stored.float() / g
        extras["global_scale"] = g
    else:
        scale = mx.mx_scale_values(stored, spec.number_format)
    rows, cols = codes.shape
    if stored.shape != (rows, cols // spec.group_size):
        raise LowbitError(f"{name}: weight_scale is {list(stored.shape)}, expected [{rows}, {cols // spec.group_size}]")
    return QuantizedTensor(codes.contiguous(), scale.reshape(rows, -1), torch.zeros(rows, scale.numel() // rows), spec,
                           extras=extras)


def block_act_from_tensors(tensors: dict, name: str, q: QuantizedTensor, inputs: dict) -> BlockActWeight:
    """A block-format weight whose input args quantise activations to its own element format and block
    (the presets' W4A4 / W8A8); any other activation scheme on a block weight is refused in one line."""
    spec = q.spec
    want = block_input_args(spec)
    keys = ("num_bits", "type", "strategy", "group_size", "symmetric")
    if any(inputs.get(k) != want[k] for k in keys) or not inputs.get("dynamic"):
        got = ", ".join(f"{k}={inputs.get(k)!r}" for k in (*keys, "dynamic"))
        raise LowbitError(f"{name}: activations on a {spec.format} g{spec.group_size} block weight must use the "
                          f"same block format, dynamically; this config has {got}")
    g = _get(tensors, f"{name}.input_global_scale") if spec.scale_dtype == mx.NV_SCALE else None
    return BlockActWeight(q, None if g is None else float(g.float().reshape(-1)[0]))



def block_weight_args(spec: QuantSpec) -> dict:
    """Weight args of an NVFP4 / MX float weight, as compressed-tensors' presets write them."""
    strategy = "tensor_group" if spec.scale_dtype == mx.NV_SCALE else "group"
    return {"num_bits": spec.bits, "type": "float", "symmetric": True, "strategy": strategy,
            "group_size": spec.group_size, "dynamic": False, "actorder": None, "observer": "minmax",
            "block_structure": None, "scale_dtype": SCALE_DTYPES[spec.scale_dtype],
            "zp_dtype": SCALE_DTYPES[spec.scale_dtype]}


def block_input_args(spec: QuantSpec) -> dict:
    """Input args of activations in the weight's block format, as compressed-tensors' NVFP4 / MXFP4 / MXFP8
    presets write them: the weights' args, computed on the fly ("local" under a static tensor scale for
    NVFP4, whose observer "static_minmax" calibrates G_x)."""
    nv = spec.scale_dtype == mx.NV_SCALE
    return {**block_weight_args(spec), "dynamic": "local" if nv else True, "observer": "static_minmax" if nv else None}


def _get(tensors: dict, key: str) -> torch.Tensor:
    if key not in tensors:
        raise LowbitError(f"compressed-tensors checkpoint lacks {key}")
    return tensors.pop(key)
