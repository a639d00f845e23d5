"""Which module runs which weight type, and which class rebuilds a saved module.

Each module class registers itself with the weight types it runs (`@register_module(QuantizedTensor)`)
and offers `from_weight(weight, bias, **options)`; methods never pick modules. MODULES maps the class
name recorded in a saved model's lowbit_config.json to the class (rebuilt empty by from_layer_config).
"""
from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError

MODULES: dict[str, type] = {}
WEIGHT_MODULES: dict[type, type] = {}


def register_module(*weight_types: type):
    def register(cls):
        MODULES[cls.__name__] = cls
        for t in weight_types:
            WEIGHT_MODULES[t] = cls
        return cls
    return register


def module_for(weight, bias=None, **options) -> nn.Module:
    """The module that runs `weight` (a weight type of lowbit.weights), holding it and the bias."""
    for t in type(weight).__mro__:
        if t in WEIGHT_MODULES:
            return WEIGHT_MODULES[t].from_weight(weight, bias, **options)
    raise LowbitError(f"no module runs weights of type {type(weight).__name__}")
