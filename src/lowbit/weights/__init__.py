"""Quantised-weight types and their byte layouts, below methods/ and nn/: imports only formats/, core/
and errors. A method returns one of these; nn/ picks the module that runs it by its type; io/ writes
it, copying it bit for bit where a format can hold it.

    QuantizedTensor   codes, scales and zero points (integer or float) under a QuantSpec, with an
                      optional group index (act-order): every affine integer grid, code books
                      (NF4, FP4) and float formats on per-tensor/channel/group scales (lowbit.core)
    Quantized4bit     bitsandbytes' NF4/FP4 blocks, optionally with double-quantised absmax (bnb4.py)
    GGMLTensor        llama.cpp's ggml blocks, one class per block type (ggml/)
    ActQuantWeight    an int8 weight whose Linear also quantises its input (W8A8) (int8.py)
    MixedInt8Weight   an int8 weight with LLM.int8()'s float outlier columns (int8.py)
    FP8ActWeight      an FP8 weight whose Linear quantises its input to FP8 E4M3 (W8A8-FP8) (fp8.py)
    BlockActWeight    an MX / NVFP4 weight whose Linear quantises its input to the same block format
                      (W4A4 NVFP4 and MXFP4, W8A8 MXFP8) (block_act.py)
    SpQRWeight        SpQR's dense 3-bit base with quantised statistics plus sparse fp16 outliers (sparse.py)

    QuipWeight        QuIP#'s E8 lattice codes of the Hadamard-rotated weight, with the rotation's signs (codebook.py)
    TernaryWeight     BitNet b1.58's ternary codes {-1, 0, +1} with one absmean scale per tensor (ternary.py)
    AQLMWeight        AQLM's additive codes: per 8 inputs a sum of codewords of M learned codebooks (codebook.py)

A new weight type is a module here with
dequantize(), shape, dtype, storage_bits/bits_per_element/nbytes, plus a module registered for it in nn/.
"""
from lowbit.core import QuantizedTensor
from lowbit.weights.bnb4 import Quantized4bit
from lowbit.weights.ggml import GGMLTensor
from lowbit.weights.fp8 import FP8ActWeight
from lowbit.weights.block_act import BlockActWeight
from lowbit.weights.int8 import ActQuantWeight, MixedInt8Weight
from lowbit.weights.codebook import AQLMWeight, QuipWeight
from lowbit.weights.sparse import SpQRWeight
from lowbit.weights.ternary import TernaryWeight

__all__ = ["QuantizedTensor", "Quantized4bit", "GGMLTensor", "ActQuantWeight", "MixedInt8Weight", "SpQRWeight", "QuipWeight", "AQLMWeight",
           "FP8ActWeight", "BlockActWeight", "TernaryWeight"]
