"""llama.cpp's ternary block types TQ1_0 and TQ2_0 (ggml-common.h block_tq1_0 / block_tq2_0), one class each.

A block is 256 weights d * q with q in {-1, 0, +1} and one fp16 d, stored after the codes:
  TQ1_0 (54 bytes, 1.6875 bits/weight): qs[48] five trits per byte, qh[4] four trits per byte, d.
        qs[0:32] byte j holds elements j, 32+j, ..., 128+j; qs[32:48] byte j holds 160+j, 176+j, ..., 224+j;
        qh byte j holds 240+j, 244+j, 248+j, 252+j; first element most significant, in the byte encoding
        of core.packing.trit_bytes.
  TQ2_0 (66 bytes, 2.0625 bits/weight): qs[64] q + 1 in two bits, per 128-half byte l holds elements
        l, l+32, l+64, l+96 (bits 0-1, 2-3, 4-5, 6-7: the layout of Q2_K's codes), d.
quantize is llama.cpp's quantize_row_tq{1,2}_0_ref: d = max |x| of the block, q = roundf(x / d); it uses
no importance and has nothing to search. A ternary weight trained with one absmean scale per tensor is
translated into these blocks exactly by weights/ggml/ternary.py.
"""
from __future__ import annotations

import torch

from lowbit.core.packing import byte_trits, trit_bytes
from lowbit.weights.ggml.block import BlockType
from lowbit.weights.ggml.bytes import cat, crumbs, cut, half_bytes, read_half, uncrumbs
from lowbit.weights.ggml.fields import Fields, fp16, round_half_away

# TQ1_0's three runs of its 256 trits: (first element, trits per byte, bytes)
TQ1_RUNS = ((0, 5, 32), (160, 5, 16), (240, 4, 4))


class Ternary256(BlockType):
    """The shared quantiser: absmax per block, codes rounded half away from zero (C's roundf)."""

    @classmethod
    def quantize(cls, x, qw, search):
        xb = x[..., 0, :]
        d = xb.abs().amax(-1)
        inv = torch.where(d != 0, 1 / torch.where(d != 0, d, 1.0), 0.0)
        q = round_half_away(xb * inv.unsqueeze(-1)).to(torch.int32)
        return Fields(fp16(d), q.unsqueeze(-2))


class TQ1_0(Ternary256, type_name="TQ1_0"):
    """block_tq1_0: qs[48], qh[4], fp16 d."""

    @classmethod
    def pack(cls, f):
        t = f.q[..., 0, :] + 1
        parts = [trit_bytes(t[..., s:s + k * n].reshape(*t.shape[:-1], k, n)) for s, k, n in TQ1_RUNS]
        return cat(*parts, half_bytes(f.d))

    @classmethod
    def unpack(cls, b):
        *runs, d = cut(b, *(n for _, _, n in TQ1_RUNS), 2)
        t = torch.cat([byte_trits(r, k).flatten(-2) for r, (_, k, _) in zip(runs, TQ1_RUNS)], -1)
        return Fields(read_half(d), (t - 1).unsqueeze(-2))


class TQ2_0(Ternary256, type_name="TQ2_0"):
    """block_tq2_0: qs[64], fp16 d."""

    @classmethod
    def pack(cls, f):
        return cat(crumbs(f.q[..., 0, :] + 1), half_bytes(f.d))

    @classmethod
    def unpack(cls, b):
        qs, d = cut(b, 64, 2)
        return Fields(read_half(d), (uncrumbs(qs) - 1).unsqueeze(-2))
