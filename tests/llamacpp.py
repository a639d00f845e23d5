"""llama-cpp-python for the interop tests, with llama.cpp's extra weight buffer types switched off.

On the AMX-capable machines this project runs on, llama.cpp repacks Q4_0/Q8_0 weights for its AMX
backend (an "extra buffer type") and its AMX matmul then crashes the process (a segmentation fault in
ggml_backend_amx_mul_mat, seen with llama-cpp-python 0.3.36). `use_extra_bufts = False` keeps the
ordinary CPU kernels, which every other machine runs too.
"""
from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
_low_level = pytest.importorskip("llama_cpp.llama_cpp")
_default_params = _low_level.llama_model_default_params


def _params_without_extra_buffers():
    params = _default_params()
    if hasattr(params, "use_extra_bufts"):
        params.use_extra_bufts = False
    return params


_low_level.llama_model_default_params = _params_without_extra_buffers
