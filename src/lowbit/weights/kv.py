"""Quantised key/value cache chunks, the storage of nn/kv_cache.py's cache.

The layout follows KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache"): keys are quantised per channel (one scale and zero point per head-dim channel over `group_size`
consecutive tokens), values per token (one per token over `group_size` consecutive channels), because key
outliers sit in fixed channels while values have none. The newest tokens stay in full precision until
`residual` of them have gathered; then they are quantised as one chunk and never touched again (no
re-quantisation of old tokens, unlike a cache that re-rounds everything it holds at each flush).

    KVSpec("int4", group_size=64, residual=128)     uint4 codes, fp16 scale, uint8 zero per group
    KVSpec("int8")                                   uint8 codes (asymmetric), fp16 scale, uint8 zero
    KVSpec("fp8_e4m3")                               FP8 E4M3 codes, fp16 scale per group (symmetric)

A chunk holds packed codes (uint8 bytes), scales (fp16) and zero points (uint8), so its `nbytes` is the
memory the live cache really holds; `kv_chunk_bits` is the same count in closed form for calculators.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.core import QuantizedTensor, QuantSpec, pack_bits, packed_nbytes, quantize, unpack_bits
from lowbit.errors import LowbitError

KV_FORMATS = {"int8": ("uint8", False), "int4": ("uint4", False), "int2": ("uint2", False),
              "fp8_e4m3": ("fp8_e4m3", True)}
ZERO_BYTES = 1      # an integer zero point is stored in one byte whatever the grid width
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class KVSpec:
    """format: int8 | int4 | int2 | fp8_e4m3; group_size: tokens per key scale and channels per value
    scale; residual: tokens kept in full precision before a chunk is quantised (a multiple of group_size)."""

    format: str = "int4"
    group_size: int = 64
    residual: int = 128

    def __post_init__(self):
        if self.format not in KV_FORMATS:
            raise LowbitError(f"unknown KV-cache format {self.format!r}; known: {', '.join(KV_FORMATS)}")
        for name in ("group_size", "residual"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LowbitError(f"KV-cache {name} must be a positive integer, got {v!r}")
        if self.residual % self.group_size:
            raise LowbitError(f"the KV-cache residual window ({self.residual}) must be a multiple of the group "
                              f"size ({self.group_size}): keys are quantised in groups of tokens")

    @property
    def symmetric(self) -> bool:
        return KV_FORMATS[self.format][1]

    @property
    def bits(self) -> int:
        return self.quant_spec(self.group_size).bits

    def quant_spec(self, group: int) -> QuantSpec:
        fmt, symmetric = KV_FORMATS[self.format]
        return QuantSpec(fmt, "group", group, symmetric=symmetric, scale_dtype="fp16")

    def value_group(self, head_dim: int) -> int:
        """Channels per value scale: group_size, or the whole head when the head is narrower or not a multiple."""
        return self.group_size if head_dim % self.group_size == 0 else head_dim

    @classmethod
    def parse(cls, text: str) -> "KVSpec":
        """"int4", "int4-g32", "int8-g64-r256", "fp8" -> KVSpec."""
        if not isinstance(text, str) or not text:
            raise LowbitError(f"a KV-cache scheme is a name such as 'int4' or 'int8-g64-r128', got {text!r}")
        fmt, *rest = text.lower().split("-")
        kw = {}
        for word in rest:
            key = {"g": "group_size", "r": "residual"}.get(word[:1])
            if key is None or not word[1:].isdigit():
                raise LowbitError(f"cannot read {word!r} in KV-cache scheme {text!r}: use g<group> and r<residual>")
            kw[key] = int(word[1:])
        if kw.get("group_size", 1) < 1:
            raise LowbitError(f"KV-cache group_size must be a positive integer, got {kw['group_size']}")
        if "group_size" in kw and "residual" not in kw:
            kw["residual"] = max(128 // kw["group_size"], 1) * kw["group_size"]
        return cls("fp8_e4m3" if fmt == "fp8" else fmt, **kw)

    @property
    def name(self) -> str:
        return f"{self.format}-g{self.group_size}-r{self.residual}"


@dataclass
class KVChunk:
    """One quantised run of keys or values of shape [batch, heads, tokens, head_dim].

    codes: uint8 [packed bytes]; scale: fp16 [rows, groups]; zero: uint8 [rows, groups] or None (symmetric).
    Rows are (batch, head, channel) for keys (groups along tokens) and (batch, head, token) for values
    (groups along channels)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, int, int, int]
    per_channel: bool
    spec: QuantSpec
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def dequantize(self) -> torch.Tensor:
        rows = _rows(self.shape, self.per_channel)
        n = rows[0] * rows[1]
        codes = unpack_bits(self.codes, self.spec.bits, n).reshape(rows)
        scale = self.scale.float()
        zero = torch.full_like(scale, self.spec.implied_zero) if self.zero is None else self.zero.float()
        q = QuantizedTensor(codes=codes, scale=scale, zero=zero, spec=self.spec)
        return _from_rows(q.dequantize(), self.shape, self.per_channel).to(self.dtype)


def _rows(shape, per_channel: bool) -> tuple[int, int]:
    b, h, t, d = shape
    return (b * h * d, t) if per_channel else (b * h * t, d)


def _to_rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return x.transpose(-1, -2).reshape(-1, x.shape[-2]) if per_channel else x.reshape(-1, x.shape[-1])


def _from_rows(rows: torch.Tensor, shape, per_channel: bool) -> torch.Tensor:
    b, h, t, d = shape
    return rows.reshape(b, h, d, t).transpose(-1, -2) if per_channel else rows.reshape(b, h, t, d)


def quantize_chunk(x: torch.Tensor, spec: KVSpec, per_channel: bool) -> KVChunk:
    """Keys (per_channel=True; tokens a multiple of spec.group_size) or values of shape [b, h, t, d].

    Raises LowbitError on NaN/Inf or a shape that the groups do not tile."""
    if x.dim() != 4:
        raise LowbitError(f"KV states have shape [batch, heads, tokens, head_dim], got {tuple(x.shape)}")
    group = spec.group_size if per_channel else spec.value_group(x.shape[-1])
    qspec = spec.quant_spec(group)
    if per_channel and x.shape[-2] % group:
        raise LowbitError(f"keys are quantised in groups of {group} tokens; got {x.shape[-2]} tokens")
    q = quantize(_to_rows(x.float(), per_channel), qspec)
    zero = None if qspec.symmetric else q.zero.to(torch.uint8)
    return KVChunk(pack_bits(q.codes, qspec.bits), q.scale.to(SCALE_DTYPE), zero, tuple(x.shape), per_channel,
                   qspec, x.dtype)


def kv_chunk_bits(spec: KVSpec, head_dim: int) -> tuple[float, float]:
    """(bits per key element, bits per value element) that quantised chunks store, scales and zeros
    included (codes packed; the closed form of KVChunk.nbytes for whole bytes)."""
    extra = 16 + (0 if spec.symmetric else 8 * ZERO_BYTES)
    return spec.bits + extra / spec.group_size, spec.bits + extra / spec.value_group(head_dim)


def chunk_code_bytes(n: int, spec: KVSpec) -> int:
    return packed_nbytes(n, spec.bits)
