"""Quantisation methods, one module each, registered by name (see methods/base.py)."""
from lowbit.methods import rtn  # noqa: F401  (registers)
from lowbit.methods import gptq  # noqa: F401  (registers)
from lowbit.methods import nf4  # noqa: F401  (registers "nf4" and "fp4")
from lowbit.methods import w8a8  # noqa: F401  (registers "w8a8")
from lowbit.methods import llm_int8  # noqa: F401  (registers "llm-int8")
from lowbit.methods import smoothquant  # noqa: F401  (registers "smoothquant")
from lowbit.methods import awq  # noqa: F401  (registers "awq")
from lowbit.methods import ggml, ggml_mix  # noqa: F401  (registers "ggml" and the llama.cpp file types "q4_k_m" ...)
from lowbit.methods.base import METHODS, MethodConfig, method_from_dict, parse_method, register_method
from lowbit.methods.rtn import RTN
from lowbit.methods.stats import LayerStats

__all__ = ["METHODS", "MethodConfig", "RTN", "LayerStats", "method_from_dict", "parse_method", "register_method"]
