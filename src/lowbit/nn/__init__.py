"""Modules that hold quantised weights and run them."""
from lowbit.nn.linear import QuantLinear

__all__ = ["QuantLinear"]
