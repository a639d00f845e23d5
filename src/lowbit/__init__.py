"""lowbit: quantisation of large language models, every major method in one place.

    import lowbit
    model, tok = lowbit.load_model()                      # the bundled model, or a HF folder
    lowbit.quantize(model, lowbit.GPTQ(bits=4, group_size=128), tokenizer=tok)
    lowbit.save(model, "out/int4", tokenizer=tok)
    lowbit.export(model, "out/int4-gptq", format="gptq", tokenizer=tok)

Method configs (RTN, GPTQ, AWQ, SmoothQuant, W8A8, LLMInt8, NF4, FP4, GGMLQuant, HQQ, SpQR) take a scheme
(QuantSpec, or short words such as "int4-g128"; QuIP and AQLM take bits and codebooks) and are also reachable by short name
(lowbit.parse_method("gptq-int4-g128-actorder")). Tensors: lowbit.quantize_tensor(x, QuantSpec("int4",
"group", 128)) -> QuantizedTensor. `import lowbit` loads no model library: transformers and the
pipeline load when a model function is first called.
"""
from lowbit._version import __version__
from lowbit.core import QuantizedTensor, QuantSpec, dequantize, fake_quantize
from lowbit.core import quantize as quantize_tensor
from lowbit.errors import LowbitError
from lowbit.formats import get_format, list_formats
from lowbit.methods import (AWQ, FP4, GPTQ, METHODS, NF4, RTN, W8A8, BitNet, GGMLQuant, LLMInt8, Recipe,
                            SmoothQuant, parse_method)
from lowbit.methods.hqq import HQQ
from lowbit.methods.aqlm import AQLM
from lowbit.methods.quip import QuIP
from lowbit.methods.spqr import SpQR
from lowbit.methods.qat import QAT

_API = ("quantize", "save", "load", "load_model", "export")
_EVAL = ("evaluate", "compare")


def __getattr__(name):
    # The model API pulls in transformers; import it only when used so `import lowbit` stays light.
    if name in _API:
        from lowbit import api

        return getattr(api, name)
    if name in _EVAL:
        from lowbit import eval as evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = ["QuantSpec", "QuantizedTensor", "quantize_tensor", "dequantize", "fake_quantize", "RTN", "GPTQ", "AWQ",
           "SmoothQuant", "W8A8", "LLMInt8", "NF4", "FP4", "GGMLQuant", "HQQ", "SpQR", "QuIP", "AQLM", "QAT", "Recipe", "METHODS", "parse_method",
           "get_format", "list_formats", "LowbitError", *_API, *_EVAL, "__version__"]
__all__ += ["BitNet"]      # BitNet b1.58's ternary weights (methods/bitnet.py; trained by `lowbit bitnet`)
