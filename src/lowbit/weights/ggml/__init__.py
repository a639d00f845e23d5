"""llama.cpp's ggml block types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the k-quants Q2_K .. Q6_K, ternary TQ1_0/TQ2_0.

Organised as gguf-py's quants.py: one class per block type (legacy.py, kquants.py, tquants.py) with its field
choice, pack and unpack side by side, registered in BLOCK_TYPES by subclassing BlockType with
`type_name=`; ids and sizes from the one table GGML_TYPES (block.py). Fields, ggml's rounding and the
choice among candidate fields are in fields.py, the ported llama.cpp scale searches in search.py, the
byte plumbing in bytes.py, the tensor-level API in tensor.py, and the exact translation of affine
integer weights into legacy types in affine.py, of per-tensor ternary weights into TQ types in ternary.py.
"""
from lowbit.weights.ggml.affine import ggml_from_affine, legacy_type
from lowbit.weights.ggml.block import BLOCK_TYPES, GGML_TYPES, QK_K, BlockType
from lowbit.weights.ggml.fields import Fields
from lowbit.weights.ggml.kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from lowbit.weights.ggml.legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from lowbit.weights.ggml.ternary import TERNARY_TYPES, ggml_from_ternary, retype_ternary
from lowbit.weights.ggml.tquants import TQ1_0, TQ2_0
from lowbit.weights.ggml.tensor import (FALLBACK_TYPES, GGML_TYPE_NAMES, PLAIN_TYPES, GGMLTensor, bits_per_weight,
                                        block_size, canonical_type, dequantize_ggml, fit_type, quantize_ggml,
                                        quantize_to_tensor, row_nbytes, unpack_ggml)

__all__ = [
    "GGMLTensor", "quantize_ggml", "unpack_ggml", "dequantize_ggml", "quantize_to_tensor",
    "canonical_type", "block_size", "row_nbytes", "bits_per_weight", "fit_type",
    "FALLBACK_TYPES", "PLAIN_TYPES", "GGML_TYPE_NAMES", "BLOCK_TYPES", "GGML_TYPES", "QK_K",
    "BlockType", "Fields", "ggml_from_affine", "legacy_type", "ggml_from_ternary", "retype_ternary", "TERNARY_TYPES", "TQ1_0", "TQ2_0",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
]
