"""Fused low-bit matmuls on CPU: a weight's packed buffers described to the compiled kernels (kernels/csrc).

A `Plan` holds a C struct pointing into the module's own tensors (codes, scales, zeros or ggml blocks;
nothing is copied or repacked) and keeps those tensors alive. `plan.matmul(x)` computes x W^T:
- decoding (up to GEMV_ROWS activation rows): the fused kernels read the packed codes and scales and
  never build the float weight;
- prefill (more rows): tiles of TILE_FLOATS exact float weights are decoded from the same packed data and
  multiplied by torch's matmul, so only one tile of floats exists at a time.
Compute dtypes: float32 (activations as given) and bfloat16 (activations and every weight rounded to
bfloat16 first, as the Python path does before its bf16 matmul); anything else returns None and the
caller runs its Python path. Results equal the Python path up to the order of the float32 sums
(tests/kernels state the bound).
"""
from __future__ import annotations

import ctypes

import torch

from lowbit.kernels.native import library

AFFINE, GGML = 0, 1
SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ZERO_KINDS = {torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
SCALE_BNB_DQ, ZERO_NONE, ZERO_INT = 3, 0, 1
ROUND_NONE, ROUND_BF16 = 0, 1
GEMV_ROWS = 8                 # up to this many activation rows: the fused kernels
TILE_FLOATS = 1 << 20         # floats per decoded weight tile of the prefill path (4 MiB)


class AffineStruct(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64),
                ("bits", ctypes.c_int32), ("hi_first", ctypes.c_int32), ("int8_kind", ctypes.c_int32),
                ("scale_kind", ctypes.c_int32), ("zero_kind", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p), ("zero_add", ctypes.c_float),
                ("dq_offset", ctypes.c_float), ("lut", ctypes.c_void_p), ("dq_map", ctypes.c_void_p),
                ("dq_nested", ctypes.c_void_p)]


class GGMLStruct(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("row_bytes", ctypes.c_int64), ("type", ctypes.c_int32), ("pad", ctypes.c_int32)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _none():
    return None


class NoCopy:
    """Copies (deepcopy, pickle) come back as None: a plan points into its module's tensors, so a copy of the
    module must build its own."""

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_none, ())


class Plan(NoCopy):
    """A weight [n, k] as the kernels read it (copies come back as None, see NoCopy)."""

    def __init__(self, lib, family: int, struct: ctypes.Structure, keep: tuple, n: int, k: int,
                 columns: torch.Tensor | None = None):
        self.lib, self.family, self.struct, self.keep, self.n, self.k = lib, family, struct, keep, n, k
        self.columns = columns    # int64 [k]: the weight's columns are these columns of x (act-order)
        self.ref = ctypes.addressof(struct)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """x [..., k] -> [..., n] in x's dtype, computed in compute_dtype (default x's); None if unsupported."""
        if (x.dtype is torch.float32 and self.columns is None and x.is_contiguous()
                and (bias is None or bias.dtype is torch.float32)):
            m = x.numel() // self.k
            rnd = ROUND_NONE if compute_dtype in (None, torch.float32) else ROUND_BF16 if (
                compute_dtype is torch.bfloat16) else -1
            if m <= GEMV_ROWS and rnd >= 0:   # the decoding step: as little Python as possible
                y = torch.empty(x.shape[:-1] + (self.n,))
                if self.lib.lb_matmul(self.family, self.ref, x.data_ptr(), m, y.data_ptr(),
                                      None if bias is None else bias.contiguous().data_ptr(), rnd):
                    raise MemoryError("lowbit kernels: out of memory")
                return y
        return self._matmul(x, bias, compute_dtype or x.dtype)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None, compute: torch.dtype) -> torch.Tensor | None:
        if self.columns is not None:
            x = x.index_select(-1, self.columns)
        if compute is torch.float32:
            rnd, xf = ROUND_NONE, x.reshape(-1, self.k).float().contiguous()
        elif compute is torch.bfloat16:
            rnd, xf = ROUND_BF16, x.reshape(-1, self.k).to(torch.bfloat16).float().contiguous()
        else:
            return None
        if bias is not None:
            bias = (bias.to(torch.bfloat16) if rnd else bias).float().contiguous()
        m = xf.shape[0]
        if m <= GEMV_ROWS:
            y = torch.empty(m, self.n)
            if self.lib.lb_matmul(self.family, self.ref, xf.data_ptr(), m, y.data_ptr(), _ptr(bias), rnd):
                raise MemoryError("lowbit kernels: out of memory")
        else:
            y = self._tiled(xf, rnd)
            if bias is not None:
                y += bias
            if rnd:
                y = y.to(torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.n)

    def prepared(self, xf: torch.Tensor) -> torch.Tensor:
        """x [m, k] float32 as the kernels read it: [m, k], columns in `order()`."""
        stride = self.lib.lb_prep_stride(self.family, self.ref)
        prep = torch.empty(xf.shape[0], stride)
        self.lib.lb_prepare(self.family, self.ref, xf.data_ptr(), xf.shape[0], prep.data_ptr())
        return prep[:, : self.k]

    def decode(self, r0: int, r1: int, rnd: int = ROUND_NONE, out: torch.Tensor | None = None) -> torch.Tensor:
        """Exact weights of rows [r0, r1): float32 [r1 - r0, k], columns in `order()`."""
        out = torch.empty(r1 - r0, self.k) if out is None else out
        self.lib.lb_decode(self.family, self.ref, r0, r1, out.data_ptr(), rnd)
        return out

    def order(self) -> torch.Tensor:
        """int64 [k]: the weight column at each position of prepared activations and decoded rows."""
        cols = torch.empty(self.k, dtype=torch.int32)
        self.lib.lb_order(self.family, self.ref, cols.data_ptr())
        return cols.long()

    def _tiled(self, xf: torch.Tensor, rnd: int) -> torch.Tensor:
        xp = self.prepared(xf)
        rows = max(4, min(self.n, TILE_FLOATS // self.k))
        buf = torch.empty(rows, self.k)
        yt = torch.empty(self.n, xf.shape[0])
        for r0 in range(0, self.n, rows):
            r1 = min(self.n, r0 + rows)
            torch.mm(self.decode(r0, r1, rnd, buf[: r1 - r0]), xp.t(), out=yt[r0:r1])
        return yt.t().contiguous()


def affine_plan(codes: torch.Tensor, bits: int, n: int, k: int, group: int, levels: torch.Tensor,
                scales: torch.Tensor, zeros: torch.Tensor | None = None, zero_add: float = 0.0,
                int8_kind: int = 0, hi_first: bool = False, bnb_double_quant: tuple | None = None) -> Plan | None:
    """Plan for w[r, c] = (levels[code] - zero[r, g]) * scale[r, g], g = c // group (see lowbit_kernels.h).

    codes: uint8 bit stream over [n, k]; levels: float32 [2**bits] (a symmetric grid's implied zero
    subtracted); scales: [n, k // group] float32/float16/bfloat16, or uint8 codes with
    bnb_double_quant = (dynamic map [256], nested absmax, offset); zeros: None, a uint8 `bits`-bit
    stream of integer zero codes (plus zero_add), or float [n, k // group]; int8_kind: 1 int8 / 2 uint8
    levels for 8-bit codes (0: through `levels`). None when the kernels are not available.
    """
    lib = library()
    if lib is None or k % group:
        return None
    keep = [codes.contiguous(), levels.float().contiguous(), scales.contiguous()]
    s = AffineStruct(codes=_ptr(keep[0]), n=n, k=k, group=group, bits=bits, hi_first=int(hi_first),
                     int8_kind=int8_kind, lut=_ptr(keep[1]), scales=_ptr(keep[2]), zero_add=zero_add)
    if bnb_double_quant is not None:
        dq_map, nested, offset = (t.float().contiguous() for t in bnb_double_quant)
        keep += [dq_map, nested]
        s.scale_kind, s.dq_map, s.dq_nested, s.dq_offset = SCALE_BNB_DQ, _ptr(dq_map), _ptr(nested), float(offset)
    elif keep[2].dtype in SCALE_KINDS:
        s.scale_kind = SCALE_KINDS[keep[2].dtype]
    else:
        return None
    if zeros is not None:
        zeros = zeros.contiguous()
        kind = ZERO_INT if zeros.dtype == torch.uint8 else ZERO_KINDS.get(zeros.dtype)
        if kind is None:
            return None
        keep.append(zeros)
        s.zeros, s.zero_kind = _ptr(zeros), kind
    return Plan(lib, AFFINE, s, tuple(keep), n, k)


# The ggml type ids csrc/decode.h decodes (the ternary TQ1_0 / TQ2_0 keep the Python path).
KERNEL_GGML_TYPES = frozenset((2, 3, 6, 7, 8, 10, 11, 12, 13, 14))


def ggml_plan(blocks: torch.Tensor, type_id: int, n: int, k: int) -> Plan | None:
    """Plan for ggml blocks uint8 [n, row bytes] of ggml type `type_id` (2 Q4_0 ... 14 Q6_K)."""
    lib = library()
    if lib is None or type_id not in KERNEL_GGML_TYPES:
        return None
    data = blocks.contiguous()
    s = GGMLStruct(data=_ptr(data), n=n, k=k, row_bytes=data.shape[1], type=type_id)
    return Plan(lib, GGML, s, (data,), n, k)
