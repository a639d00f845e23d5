"""Quantisation methods, one module each, registered by name (see methods/base.py).

Adding a method: a module with a frozen dataclass config (subclass SchemeMethod when it chooses values
on a scheme) decorated with @register_method, whose quantize_weight returns a weight type of
lowbit.weights; then one import line here.
"""
from lowbit.methods import rtn  # noqa: F401  (registers "rtn")
from lowbit.methods import gptq  # noqa: F401  (registers "gptq")
from lowbit.methods import nf4  # noqa: F401  (registers "nf4" and "fp4")
from lowbit.methods import w8a8  # noqa: F401  (registers "w8a8")
from lowbit.methods import llm_int8  # noqa: F401  (registers "llm-int8")
from lowbit.methods import smoothquant  # noqa: F401  (registers "smoothquant")
from lowbit.methods import awq  # noqa: F401  (registers "awq")
from lowbit.methods import ggml_quant, ggml_mix  # noqa: F401  (registers "ggml" and the llama.cpp file types)
from lowbit.methods import hqq  # noqa: F401  (registers "hqq")
from lowbit.methods import spqr  # noqa: F401  (registers "spqr")
from lowbit.methods import quip  # noqa: F401  (registers "quip")
from lowbit.methods import aqlm  # noqa: F401  (registers "aqlm")
from lowbit.methods import qat  # noqa: F401  (registers "qat")
from lowbit.methods import bitnet  # noqa: F401  (registers "bitnet")
from lowbit.methods.awq import AWQ
from lowbit.methods.base import (METHODS, LayerInfo, MethodConfig, SchemeMethod, method_from_dict, parse_method,
                                 register_method)
from lowbit.methods.bitnet import BitNet
from lowbit.methods.ggml_quant import GGMLQuant
from lowbit.methods.gptq import GPTQ
from lowbit.methods.llm_int8 import LLMInt8
from lowbit.methods.nf4 import FP4, NF4
from lowbit.methods.qat import QAT
from lowbit.methods.recipe import Recipe
from lowbit.methods.rtn import RTN
from lowbit.methods.smoothquant import SmoothQuant
from lowbit.methods.stats import LayerStats
from lowbit.methods.w8a8 import W8A8

__all__ = ["METHODS", "MethodConfig", "SchemeMethod", "LayerInfo", "LayerStats", "Recipe", "RTN", "GPTQ", "AWQ",
           "SmoothQuant", "W8A8", "LLMInt8", "NF4", "FP4", "GGMLQuant", "QAT", "BitNet", "method_from_dict", "parse_method",
           "register_method"]
