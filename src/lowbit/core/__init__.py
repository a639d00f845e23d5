"""The quantisation equation: QuantSpec, quantize()/dequantize(), observers, bit packing."""
from lowbit.core import mx
from lowbit.core.blocks import block_shape, check_tensor, from_blocks, to_blocks
from lowbit.core.observers import KL, MSE, OBSERVERS, MinMax, Percentile, get_observer
from lowbit.core.packing import pack_bits, pack_trits, packed_nbytes, trit_nbytes, unpack_bits, unpack_trits
from lowbit.core.qparams import (decode_blocks, encode_blocks, fake_quantize_blocks, global_scale, round_scale_up,
                                  scale_and_zero)
from lowbit.core.quantize import QuantizedTensor, dequantize, fake_quantize, quantize
from lowbit.core.spec import GRANULARITIES, SCALE_DTYPES, QuantSpec

__all__ = [
    "QuantSpec", "QuantizedTensor", "quantize", "dequantize", "fake_quantize",
    "MinMax", "Percentile", "MSE", "KL", "OBSERVERS", "get_observer",
    "pack_bits", "unpack_bits", "packed_nbytes", "pack_trits", "unpack_trits", "trit_nbytes",
    "mx", "global_scale", "scale_and_zero", "round_scale_up", "encode_blocks", "decode_blocks", "fake_quantize_blocks",
    "block_shape", "to_blocks", "from_blocks", "check_tensor", "GRANULARITIES", "SCALE_DTYPES",
]
