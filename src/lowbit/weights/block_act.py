"""Block-format weights whose Linear also quantises its input to the same block format (W4A4 NVFP4 and
MXFP4, W8A8 MXFP8, W6A6 MXFP6), as compressed-tensors' NVFP4 / MXFP4 presets and vLLM's
CompressedTensorsW4A4Fp4 / W4A4Mxfp4 / W8A8Mxfp8 schemes define them. nn/block_act.py runs it.

The activation's spec is the weight's: the same element format and block, along the input (reduction)
dimension K, so every product in the matmul pairs one activation block with one weight block.

    MX (OCP MX v1.0):  each block of 32 inputs of each token gets its E8M0 scale on the fly (no
                       calibration; compressed-tensors: strategy "group", dynamic True)
    NVFP4:             each block of 16 inputs gets an E4M3 scale on the fly under one static FP32
                       tensor scale G_x = 448 * 6 / amax(x), amax over the calibration tokens
                       (compressed-tensors: strategy "tensor_group", dynamic "local", observer
                       "static_minmax"; stored as <m>.input_global_scale, a divisor like the weight's G)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lowbit.core import QuantizedTensor, QuantSpec, mx
from lowbit.errors import LowbitError
from lowbit.weights.int8 import _Int8Weight

# activation word -> element bits it needs (the weight's element format must have them)
ACT_WORDS = {4: "a4", 6: "a6", 8: "a8"}


def check_block_activation(spec: QuantSpec, act_bits: int) -> None:
    """A one-line error unless `spec` is a microscaling float scheme whose elements have `act_bits` bits."""
    fmt = spec.number_format
    block = spec.scale_dtype in (mx.MX_SCALE, mx.NV_SCALE) and not fmt.is_integer
    if not block or fmt.bits != act_bits:
        word = ACT_WORDS.get(act_bits, f"a{act_bits}")
        wants = {4: "mxfp4 or nvfp4", 6: "mxfp6_e2m3 or mxfp6_e3m2", 8: "mxfp8_e4m3 or mxfp8_e5m2"}.get(
            act_bits, "a microscaling float scheme")
        raise LowbitError(f"block-format activations {word!r} go with the {act_bits}-bit block schemes ({wants}), "
                          f"not {spec.format} {spec.granularity}"
                          f"{'' if spec.group_size is None else f' g{spec.group_size}'} {spec.scale_dtype} scales")


def input_global_scale(amax: float) -> float:
    """NVFP4's static activation tensor scale G_x = 448 * 6 / amax (compressed-tensors' rule, core/mx.py)."""
    return float(mx.nv_global_scale(amax)[0])


@dataclass
class BlockActWeight(_Int8Weight):
    """weight: an MX or NVFP4 QuantizedTensor [out, in]; input_global_scale: G_x (NVFP4 only, a positive
    float; None for MX). Size and values are the weight's; activations are quantised at run time."""

    weight: QuantizedTensor
    input_global_scale: float | None = None

    def __post_init__(self):
        spec = self.weight.spec
        check_block_activation(spec, spec.number_format.bits)
        if self.weight.g_idx is not None:
            raise LowbitError("block-format activations need contiguous weight blocks (no act-order group index)")
        nv = spec.scale_dtype == mx.NV_SCALE
        g = self.input_global_scale
        if nv and not (g is not None and math.isfinite(float(g)) and float(g) > 0):
            raise LowbitError("NVFP4 activations need a positive calibrated input global scale")
        if not nv and g is not None:
            raise LowbitError("MX activations take no input global scale (their block scales are computed on the fly)")

    @property
    def activation_spec(self) -> QuantSpec:
        """The activations' scheme: the weight's element format and block along K."""
        return self.weight.spec
