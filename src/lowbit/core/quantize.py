"""quantize() / dequantize() and the QuantizedTensor they exchange."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.core.blocks import block_shape, check_tensor, to_blocks
from lowbit.core.observers import get_observer
from lowbit.core.packing import pack_bits, packed_nbytes
from lowbit.core.qparams import decode_blocks, encode_blocks, scale_and_zero
from lowbit.core.qparams import global_scale as tensor_scale
from lowbit.core.spec import QuantSpec


class StoredSize:
    """bits_per_element and nbytes of a quantised weight type, from its storage_bits and numel."""

    @property
    def bits_per_element(self) -> float:
        return self.storage_bits / self.numel

    @property
    def nbytes(self) -> int:
        return (self.storage_bits + 7) // 8


@dataclass
class QuantizedTensor(StoredSize):
    """Codes, scales and zero points of one tensor, with the spec that says how to read them.

    codes: uint8 code per element, shaped like the original tensor (bit patterns of the format)
    scale: float32 [rows, blocks per row], already rounded to spec.scale_dtype
    zero:  float32 [rows, blocks per row]: integer-valued, or a free float (spec.zero_dtype); implied
           (not stored) when symmetric
    g_idx: optional int32 [columns]: the group of each column when groups are not contiguous
           (GPTQ with act-order); None means column c belongs to group c // group_size
    extras: method-specific tensors (codebooks, sparse outliers, ...) that travel with the weight;
            "global_scale" float32 [1]: NVFP4's tensor scale G (scale holds the effective s / G)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    dtype: torch.dtype = torch.float32
    g_idx: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def numel(self) -> int:
        return self.codes.numel()

    def dequantize(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self._dequantize_with_g_idx()
        blocks = self.codes.reshape(block_shape(self.shape, self.spec))
        return decode_blocks(blocks, self.scale, self.zero, self.spec).reshape(self.shape).to(self.dtype)

    def _dequantize_with_g_idx(self) -> torch.Tensor:
        rows = self.shape[0]
        levels = self.spec.number_format.decode(self.codes.reshape(rows, -1))
        g = self.g_idx.long()
        return ((levels - self.zero[:, g]) * self.scale[:, g]).reshape(self.shape).to(self.dtype)

    @property
    def storage_bits(self) -> int:
        """Exact bits to store this tensor packed: codes, plus a scale (and zero) per block."""
        n_blocks = self.scale.numel()
        code_bytes = packed_nbytes(self.numel, self.spec.bits)
        return 8 * code_bytes + n_blocks * (self.spec.scale_bits + self.spec.zero_bits) + 32 * (
            "global_scale" in self.extras)

    def packed_codes(self) -> torch.Tensor:
        return pack_bits(self.codes, self.spec.bits)


def quantize(x: torch.Tensor, spec: QuantSpec, observer="minmax",
             global_scale: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantise `x` under `spec`, with the block ranges chosen by `observer` (name or instance).
    global_scale: NVFP4's tensor scale G (float32 [1]) when it is fixed in advance (a calibrated
    activation scale); None computes it from x's own amax."""
    check_tensor(x)
    blocks = to_blocks(x.detach().float(), spec)
    lo, hi = get_observer(observer)(blocks, spec)
    g = tensor_scale(torch.stack([lo, hi]), spec)
    if g is not None and global_scale is not None:
        g = global_scale.float().reshape(1)
    scale, zero = scale_and_zero(lo, hi, spec, g)
    codes = encode_blocks(blocks, scale, zero, spec).reshape(x.shape)
    extras = {} if g is None else {"global_scale": g}
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, spec=spec, dtype=x.dtype, extras=extras)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    return q.dequantize()


def fake_quantize(x: torch.Tensor, spec: QuantSpec, observer="minmax") -> torch.Tensor:
    """x rounded through `spec` and back, in x's dtype."""
    return quantize(x, spec, observer).dequantize()
