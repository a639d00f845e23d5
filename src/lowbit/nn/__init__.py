"""Modules that hold quantised weights and run them, chosen by weight type (nn/registry.py):

    QuantizedTensor -> QuantLinear        Quantized4bit -> Linear4bit        GGMLTensor -> GGMLLinear
    ActQuantWeight  -> W8A8Linear         MixedInt8Weight -> Int8MixedLinear   SpQRWeight -> SpQRLinear
    FP8ActWeight    -> FP8Linear          QuipWeight -> QuipLinear
    BlockActWeight  -> BlockActLinear     (MX / NVFP4 weights and activations)
    AQLMWeight      -> AQLMLinear         TernaryWeight -> TernaryLinear (BitNet b1.58)
"""
from lowbit.nn.aqlm import AQLMLinear
from lowbit.nn.block_act import BlockActLinear
from lowbit.nn.fp8 import FP8Linear
from lowbit.nn.ggml_linear import GGMLLinear
from lowbit.nn.linear import QuantLinear
from lowbit.nn.linear4bit import Linear4bit
from lowbit.nn.registry import MODULES, WEIGHT_MODULES, module_for, register_module
from lowbit.nn.quip import QuipLinear
from lowbit.nn.spqr import SpQRLinear
from lowbit.nn.ternary import TernaryLinear
from lowbit.nn.w8a8 import Int8MixedLinear, W8A8Linear

__all__ = ["QuantLinear", "Linear4bit", "GGMLLinear", "W8A8Linear", "Int8MixedLinear", "SpQRLinear", "QuipLinear", "AQLMLinear", "FP8Linear", "BlockActLinear", "TernaryLinear", "MODULES", "WEIGHT_MODULES",
           "module_for", "register_module"]
