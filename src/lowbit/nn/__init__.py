"""Modules that hold quantised weights and run them.

MODULES maps the name recorded in a saved model's lowbit_config.json to the class that rebuilds the
module (`from_layer_config`); each module class adds itself here.
"""
from lowbit.nn.linear import QuantLinear

MODULES = {"QuantLinear": QuantLinear}


def register_module(cls):
    MODULES[cls.__name__] = cls
    return cls


__all__ = ["QuantLinear", "MODULES", "register_module"]

from lowbit.nn import linear4bit  # noqa: E402,F401  (registers Linear4bit; needs register_module above)
from lowbit.nn import w8a8  # noqa: E402,F401  (registers W8A8Linear and Int8MixedLinear)
from lowbit.nn import ggml_linear  # noqa: E402,F401  (registers GGMLLinear)
