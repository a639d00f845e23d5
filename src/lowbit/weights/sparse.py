"""SpQR's weight (Dettmers et al., 2023, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM
Weight Compression"): a dense low-bit base in small groups whose statistics are themselves quantised,
plus a sparse matrix of fp16 corrections at the outlier weights.

    W ≈ (codes - zero[g]) * scale[g]  +  S           g: the group of a column (contiguous, or g_idx)

    codes   uint8 [out, in], `bits`-bit codes of the base, groups of `group_size` input columns
    scale   QuantizedTensor [n_groups, out]: the per-(row, group) scales, quantised again along the
            output rows in second-level groups (3-bit codes with an fp16 scale and zero per group)
    zero    QuantizedTensor [n_groups, out]: the float zero points, likewise
    S       CSR: row_ptr int32 [out + 1], col_idx int16 [nnz] (original column order), values fp16
            [nnz] = the outlier weight minus the base's value there (so base + S gives it back)
    g_idx   optional int32 [in]: the group of each column (act-order); None means c // group_size

nn/spqr.py runs it: a dense dequantised base product plus a sparse product with S.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.core import QuantizedTensor, packed_nbytes
from lowbit.core.quantize import StoredSize
from lowbit.errors import LowbitError

ROW_PTR_BITS, COL_BITS, VALUE_BITS, G_IDX_BITS = 32, 16, 16, 16


@dataclass
class SpQRWeight(StoredSize):
    codes: torch.Tensor
    scale: QuantizedTensor
    zero: QuantizedTensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    values: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        out, n_in = self.codes.shape
        n_groups = n_in // self.group_size
        if n_in % self.group_size or tuple(self.scale.shape) != (n_groups, out) or self.zero.shape != self.scale.shape:
            raise LowbitError(f"SpQR statistics of shape {tuple(self.scale.shape)} do not fit codes {tuple(self.codes.shape)} "
                              f"in groups of {self.group_size}")
        if self.row_ptr.numel() != out + 1 or self.col_idx.numel() != self.values.numel():
            raise LowbitError("SpQR outliers: row_ptr needs out + 1 entries and one column index per value")
        if n_in > 1 << COL_BITS - 1:
            raise LowbitError(f"SpQR's 16-bit column indices hold at most {1 << COL_BITS - 1} inputs, not {n_in}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def numel(self) -> int:
        return self.codes.numel()

    @property
    def n_outliers(self) -> int:
        return int(self.values.numel())

    @property
    def outlier_fraction(self) -> float:
        return self.n_outliers / self.numel

    def group_index(self) -> torch.Tensor:
        """The group of each input column (int64 [in])."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.shape[1]) // self.group_size

    def base(self) -> torch.Tensor:
        """The dense part, (codes - zero) * scale, float32 [out, in]."""
        g = self.group_index()
        scale, zero = self.scale.dequantize().float().T, self.zero.dequantize().float().T   # [out, n_groups]
        return (self.codes.float() - zero[:, g]) * scale[:, g]

    def rows(self) -> torch.Tensor:
        """The row of each stored outlier (int64 [nnz])."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0]), counts)

    def sparse_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x S^T for x [..., in]: each stored outlier adds x[..., col] * value to output `row`, O(nnz) per
        input row (float32 [..., out])."""
        x2 = x.reshape(-1, self.shape[1]).float()
        y = torch.zeros(x2.shape[0], self.shape[0])
        y.index_add_(1, self.rows(), x2[:, self.col_idx.long()] * self.values.float())
        return y.reshape(*x.shape[:-1], self.shape[0])

    def dequantize(self) -> torch.Tensor:
        w = self.base()
        w[self.rows(), self.col_idx.long()] += self.values.float()
        return w.to(self.dtype)

    @property
    def storage_bits(self) -> int:
        """Everything stored: packed codes, both quantised statistics with their second-level scales and
        zeros, the CSR outliers (row pointers, 16-bit columns, fp16 values) and g_idx if any."""
        out, n_in = self.shape
        bits = 8 * packed_nbytes(self.numel, self.bits) + self.scale.storage_bits + self.zero.storage_bits
        bits += (out + 1) * ROW_PTR_BITS + self.n_outliers * (COL_BITS + VALUE_BITS)
        return bits + (n_in * G_IDX_BITS if self.g_idx is not None else 0)


def csr_from_coo(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int):
    """(row_ptr int32 [n_rows + 1], col_idx int16, values fp16) sorted by (row, column)."""
    order = torch.argsort(rows * (1 << 20) + cols, stable=True)
    rows, cols, values = rows[order], cols[order], values[order]
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0).to(torch.int32)
    return row_ptr, cols.to(torch.int16), values.to(torch.float16)
