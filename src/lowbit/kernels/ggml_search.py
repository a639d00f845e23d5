"""llama.cpp's scale searches compiled (csrc/ggml_search.cpp): what lowbit.weights.ggml.search runs inside
`searches()`.

The ggml quantisers spend their time in four per-sub-block searches whose steps depend on each other
(make_qkx_quants' trials move its minimum; coordinate descent moves one code at a time), so torch can only
vectorise them across sub-blocks, a few dozen small tensor operations per step. In C each sub-block runs
its loops directly, sub-blocks spread over OpenMP threads. The results are the torch versions' up to the
order of each sub-block's sums (left to right here, as in llama.cpp).
"""
from __future__ import annotations

import contextlib
import ctypes

import torch

from lowbit.kernels.native import library
from lowbit.weights.ggml.search import native_searches


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).float().contiguous()


class NativeSearches:
    """The four searches with search.py's signatures and results, on the compiled library."""

    def __init__(self, lib):
        self.lib = lib
        f32, i64, vp, i32 = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.lb_make_qkx.argtypes = [vp, vp, i64, i32, i32, f32, f32, i32, i32, vp, vp, vp]
        lib.lb_make_qx.argtypes = [vp, vp, i64, i32, i32, vp, vp]
        lib.lb_make_qp.argtypes = [vp, vp, i64, i32, i32, vp, vp]
        lib.lb_make_q3.argtypes = [vp, i64, i32, i32, vp, vp]
        for name in ("lb_make_qkx", "lb_make_qx", "lb_make_qp", "lb_make_q3"):
            getattr(lib, name).restype = ctypes.c_int

    @staticmethod
    def _out(x: torch.Tensor):
        b, n = x.shape
        return torch.empty(b), torch.empty(b, n, dtype=torch.int32)

    def make_qkx_quants(self, x, w, nmax, rmin, rdelta, nstep, use_mad):
        shape, xf, wf = x.shape, _flat(x), _flat(w.expand_as(x))
        scale, l = self._out(xf)
        the_min = torch.empty_like(scale)
        self._check(self.lib.lb_make_qkx(xf.data_ptr(), wf.data_ptr(), xf.shape[0], xf.shape[1], nmax, rmin, rdelta,
                                         nstep, int(use_mad), scale.data_ptr(), the_min.data_ptr(), l.data_ptr()))
        return scale.reshape(shape[:-1]), the_min.reshape(shape[:-1]), l.reshape(shape)

    def make_qx_quants(self, x, nmax, w):
        shape, xf = x.shape, _flat(x)
        wf = None if w is None else _flat(w.expand_as(x))
        scale, l = self._out(xf)
        self._check(self.lib.lb_make_qx(xf.data_ptr(), None if wf is None else wf.data_ptr(), xf.shape[0],
                                        xf.shape[1], nmax, scale.data_ptr(), l.data_ptr()))
        return scale.reshape(shape[:-1]), l.reshape(shape)

    def make_qp_quants(self, x, nmax, w):
        shape, xf, wf = x.shape, _flat(x), _flat(w.expand_as(x))
        scale, l = self._out(xf)
        self._check(self.lib.lb_make_qp(xf.data_ptr(), wf.data_ptr(), xf.shape[0], xf.shape[1], nmax,
                                        scale.data_ptr(), l.data_ptr()))
        return scale.reshape(shape[:-1]), l.reshape(shape)

    def make_q3_quants(self, x, nmax):
        shape, xf = x.shape, _flat(x)
        scale, l = self._out(xf)
        self._check(self.lib.lb_make_q3(xf.data_ptr(), xf.shape[0], xf.shape[1], nmax, scale.data_ptr(), l.data_ptr()))
        return scale.reshape(shape[:-1]), l.reshape(shape)

    @staticmethod
    def _check(rc: int) -> None:
        if rc:
            raise ValueError("ggml search: sub-blocks of 1..256 weights only")


def searches():
    """A context in which lowbit.weights.ggml quantises with the compiled searches (a no-op without them)."""
    lib = library()
    return native_searches(NativeSearches(lib)) if lib is not None else contextlib.nullcontext()
