"""Fields: the decoded content of a tensor's blocks, ggml's rounding, and the choice among candidates.

A block dequantises to  (d * sc) * q - (dmin * m),  computed in float32 in exactly the order gguf-py
and ggml use, so our values equal theirs bit for bit. Quantising = choosing the fields; the helpers
here recompute codes under stored scales (requantize), refit the super-block scales by least squares
(refit) and keep, per super-block, the candidate that reconstructs the weights best (best_of).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


# ----------------------------------------------------------------------------------------------------
# Fields, shaped [rows, blocks per row, ...]
# ----------------------------------------------------------------------------------------------------
@dataclass
class Fields:
    d: torch.Tensor                   # [R, nb] float32, fp16-representable
    q: torch.Tensor                   # [R, nb, nsub, sub] int32 codes as they multiply the scale (signed or not)
    sc: torch.Tensor | None = None    # [R, nb, nsub] int32 sub-block scales (None: 1)
    dmin: torch.Tensor | None = None  # [R, nb] float32 (None: no offset)
    m: torch.Tensor | None = None     # [R, nb, nsub] int32 sub-block mins (None: 1)

    def scales(self) -> torch.Tensor:
        """Effective float scale of each sub-block, d * sc, as ggml computes it."""
        d = self.d.unsqueeze(-1)
        return d if self.sc is None else d * self.sc.float()

    def offsets(self) -> torch.Tensor | None:
        if self.dmin is None:
            return None
        dmin = self.dmin.unsqueeze(-1)
        return dmin if self.m is None else dmin * self.m.float()

    def values(self) -> torch.Tensor:
        v = self.scales().unsqueeze(-1) * self.q.float()
        off = self.offsets()
        return v if off is None else v - off.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------------
# Rounding as ggml does it, in float32
# ----------------------------------------------------------------------------------------------------
def nearest_int(t: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (the 1.5*2^23 trick): round half to even on float32."""
    return torch.round(t)


def round_half_away(t: torch.Tensor) -> torch.Tensor:
    """C's roundf. t - trunc(t) is exact in float32, so this has no double-rounding step."""
    whole = torch.trunc(t)
    return whole + torch.trunc(2 * (t - whole))


def fp16(t: torch.Tensor) -> torch.Tensor:
    """The float32 value of t stored as ggml_half (round to nearest even)."""
    return t.to(torch.float16).float()


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude, with its sign (first one on ties, as ggml's strict '>')."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# Final codes from the stored (fp16) scales, and the least-squares refit of d (and dmin)
# ----------------------------------------------------------------------------------------------------
def requantize(x: torch.Tensor, f: Fields, lo: int, hi: int) -> Fields:
    """Codes for x under f's stored scales: round((x + offset) / scale); sub-blocks whose scale is zero
    keep their codes (as ggml does: their values are the offset either way)."""
    scale = f.scales().unsqueeze(-1)
    off = f.offsets()
    num = x if off is None else x + off.unsqueeze(-1)
    live = scale != 0
    q = nearest_int(num / torch.where(live, scale, 1.0)).clamp(lo, hi).to(torch.int32)
    return replace(f, q=torch.where(live, q, f.q))


def refit(x: torch.Tensor, ew: torch.Tensor | None, f: Fields, lo: int, hi: int) -> Fields:
    """Given the integer codes and sub-block integers, the (weighted) least-squares d (and dmin) of the
    whole super-block, stored as fp16, then codes recomputed under them."""
    w = torch.ones_like(x) if ew is None else ew
    a = f.q.float() * (1.0 if f.sc is None else f.sc.float().unsqueeze(-1))      # x ~ d*a - dmin*b
    saa, sax = (w * a * a).sum((-1, -2)), (w * a * x).sum((-1, -2))
    if f.dmin is None:
        ok = saa > 0
        d = torch.where(ok, sax / torch.where(ok, saa, 1.0), f.d)
        return requantize(x, replace(f, d=fp16(d)), lo, hi)
    b = torch.ones_like(x) if f.m is None else f.m.float().unsqueeze(-1).expand_as(x)
    sbb, sab, sbx = (w * b * b).sum((-1, -2)), (w * a * b).sum((-1, -2)), (w * b * x).sum((-1, -2))
    det = saa * sbb - sab * sab
    ok = det > 0
    det = torch.where(ok, det, 1.0)
    d = (sax * sbb - sab * sbx) / det
    dmin = (sax * sab - saa * sbx) / det
    keep_sign = (d >= 0) & ((dmin >= 0) | (f.m is None))
    ok = ok & keep_sign
    f2 = replace(f, d=fp16(torch.where(ok, d, f.d)), dmin=fp16(torch.where(ok, dmin, f.dmin)))
    return requantize(x, f2, lo, hi)


# ----------------------------------------------------------------------------------------------------
# Choosing among candidate fields, per super-block
# ----------------------------------------------------------------------------------------------------
def _select(fields: list[Fields], index: torch.Tensor) -> Fields:
    """Per super-block choice among candidates: index [R, nb] picks fields[index]."""
    def pick(name):
        parts = [getattr(f, name) for f in fields]
        if parts[0] is None:
            return None
        stacked = torch.stack(parts)
        idx = index.reshape(1, *index.shape, *([1] * (stacked.dim() - 3))).expand(1, *stacked.shape[1:])
        return stacked.gather(0, idx)[0]
    return Fields(*(pick(n) for n in ("d", "q", "sc", "dmin", "m")))


def _block_error(x: torch.Tensor, f: Fields, ew: torch.Tensor | None) -> torch.Tensor:
    err = (f.values() - x) ** 2
    if ew is not None:
        err = err * ew
    return err.sum((-1, -2), dtype=torch.float64)


def best_of(x: torch.Tensor, ew: torch.Tensor | None, candidates: list[Fields]) -> Fields:
    """Per super-block, the candidate with the lowest (weighted) squared error; ties go to the first."""
    if len(candidates) == 1:
        return candidates[0]
    errors = torch.stack([_block_error(x, f, ew) for f in candidates])
    errors = torch.where(torch.isfinite(errors), errors, torch.inf)   # an fp16 overflow never wins
    return _select(candidates, errors.argmin(0))


def choose(x: torch.Tensor, ew: torch.Tensor | None, found: list[Fields], lo: int, hi: int,
           search: bool) -> Fields:
    """search: each candidate also refitted, then the best per super-block; else the single replica."""
    if not search:
        return found[0]
    pool = [g for f in found for g in (f, refit(x, ew, f, lo, hi))]
    return best_of(x, ew, pool)
