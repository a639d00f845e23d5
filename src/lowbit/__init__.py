"""lowbit: quantisation of large language models, every major method in one place."""
from lowbit.core import QuantizedTensor, QuantSpec, dequantize, fake_quantize, quantize
from lowbit.errors import LowbitError
from lowbit.formats import get_format, list_formats

__version__ = "0.1.0"

__all__ = ["QuantSpec", "QuantizedTensor", "quantize", "dequantize", "fake_quantize",
           "get_format", "list_formats", "LowbitError", "__version__"]
