"""Quantisation methods, one module each, registered by name (see methods/base.py)."""
from lowbit.methods import rtn  # noqa: F401  (registers)
from lowbit.methods.base import METHODS, MethodConfig, method_from_dict, parse_method, register_method
from lowbit.methods.rtn import RTN
from lowbit.methods.stats import LayerStats

__all__ = ["METHODS", "MethodConfig", "RTN", "LayerStats", "method_from_dict", "parse_method", "register_method"]
