"""lowbit: quantisation of large language models, every major method in one place.

    import lowbit
    model, tok = lowbit.load_model()                      # the bundled model, or a HF folder
    lowbit.quantize(model, lowbit.RTN(bits=4, group_size=128), tokenizer=tok)
    lowbit.save(model, "out/int4", tokenizer=tok)

Tensors: lowbit.quantize_tensor(x, QuantSpec("int4", "group", 128)) -> QuantizedTensor.
"""
from lowbit.core import QuantizedTensor, QuantSpec, dequantize, fake_quantize
from lowbit.core import quantize as quantize_tensor
from lowbit.errors import LowbitError
from lowbit.formats import get_format, list_formats
from lowbit.methods import RTN, parse_method

__version__ = "0.1.0"


def __getattr__(name):
    # The model API pulls in transformers; import it only when used so `lowbit calc` stays fast.
    if name in ("quantize", "save", "load", "load_model", "evaluate"):
        if name == "evaluate":
            from lowbit.eval import evaluate

            return evaluate
        from lowbit import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = ["QuantSpec", "QuantizedTensor", "quantize_tensor", "dequantize", "fake_quantize", "RTN",
           "parse_method", "get_format", "list_formats", "LowbitError", "quantize", "save", "load",
           "load_model", "evaluate", "__version__"]
