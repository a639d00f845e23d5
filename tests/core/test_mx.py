"""MX (OCP Microscaling v1.0) and NVFP4 codes and scales against torchao's reference implementation
(torchao.prototype.mx_formats: to_mx with the spec's FLOOR scale rule, nvfp4_quantize), bit for bit, and
MXINT8 (which torchao lacks) against the spec's rule written out here element by element."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.core import QuantSpec, mx, quantize
from lowbit.errors import LowbitError
from lowbit.formats import get_format

MX_FLOATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1"]
EMAX = {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e2m3": 2, "fp6_e3m2": 4, "fp4_e2m1": 2, "int8": 0}


def adversarial(fmt_name: str) -> torch.Tensor:
    """Rows of 32-element blocks: random at many magnitudes, zeros, -0, fp32 subnormals, amax exactly at
    the element max, beyond it (saturation), every tie of the element grid, the fp32 extremes."""
    torch.manual_seed(0)
    fmt = get_format(fmt_name)
    top = fmt.max_value
    rows = [torch.randn(32) * 10.0 ** k for k in range(-6, 7)]
    rows += [torch.zeros(32), -torch.zeros(32), torch.full((32,), 1e-40), torch.linspace(-1e-39, 1e-39, 32)]
    emax = EMAX[fmt_name]
    for k in (-3, 0, 5):                                 # amax at the max, at 2^(emax+1) - ulp: saturates
        rows.append(torch.linspace(-top, top, 32) * 2.0 ** k)
        rows.append(torch.cat([torch.tensor([2.0 ** (emax + 1) * (1 - 2 ** -20)]), torch.randn(31)]) * 2.0 ** k)
    v = fmt.values()
    mids = ((v[1:] + v[:-1]) / 2)                        # exact ties of the element grid (X = 1)
    mids = mids[mids.abs() < top]
    for i in range(0, len(mids), 31):
        rows.append(torch.cat([torch.tensor([float(2.0 ** emax)]), mids[i:i + 31],
                               torch.zeros(max(0, 31 - len(mids[i:i + 31])))]))
    rows += [torch.full((32,), 3.0e38), torch.full((32,), -2.0 ** -126)]
    return torch.stack(rows).float().contiguous()


def torchao_mx(x: torch.Tensor, fmt_name: str):
    mxt = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    elem = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
            "fp4_e2m1": torch.float4_e2m1fn_x2}.get(fmt_name, fmt_name)
    scale, data = mxt.to_mx(x, elem, 32)
    data = data.view(torch.uint8)
    if fmt_name == "fp4_e2m1":
        data = kernels.unpack_uint4(data)
    return scale.view(torch.uint8).reshape(x.shape[0], -1), data.reshape(x.shape)


def ours_mx(x: torch.Tensor, fmt_name: str):
    q = quantize(x, QuantSpec(fmt_name, "group", 32, scale_dtype="mx"))
    return mx.mx_scale_codes(q.scale, q.spec.number_format), q.codes


@pytest.mark.parametrize("fmt", MX_FLOATS)
def test_mx_codes_and_scales_equal_torchao_bit_for_bit(fmt):
    x = adversarial(fmt)
    ref_scale, ref_codes = torchao_mx(x, fmt)
    scale, codes = ours_mx(x, fmt)
    assert torch.equal(scale, ref_scale)
    # Where the scale is 2^-127 (code 0), torchao divides by 2^-126 instead (it clamps the fp32 scale to
    # the smallest normal, a Triton workaround), so its codes do not decode to its own scale. The spec
    # decides: P = V / 2^-127. torchao given 2V (same scale code 0) divides as the spec does.
    tiny = (scale == 0).repeat_interleave(32, dim=1)
    assert tiny.any()
    _, ref_tiny = torchao_mx((x * 2).contiguous(), fmt)
    assert torch.equal(codes, torch.where(tiny, ref_tiny, ref_codes))
    assert not torch.equal(codes[tiny], ref_codes[tiny])      # the disagreement is real on these rows


@pytest.mark.parametrize("fmt", MX_FLOATS)
def test_mx_nan_and_inf_blocks(fmt):
    """A block holding NaN gets the NaN scale 0xFF in both. A block holding Inf: the spec (and its
    reference code, microsoft/microxcaling) gives the NaN scale as well; torchao's FLOOR reads Inf's
    exponent field (255) and gives the finite 2^(128 - emax) with saturated elements. The spec decides:
    lowbit writes 0xFF there, and this test records torchao's differing byte."""
    x = torch.randn(3, 32)
    x[1, 5], x[2, 7] = torch.nan, torch.inf
    ref_scale, _ = torchao_mx(x.contiguous(), fmt)
    ours = mx.mx_exponents(x.abs().amax(-1), get_format(fmt)) + 127
    ours = torch.where(ours > 254, 255, ours)
    assert ours[0] == ref_scale[0, 0] and ours[1] == 255 == ref_scale[1, 0]
    assert ours[2] == 255 and int(ref_scale[2, 0]) == 255 - EMAX[fmt]


def test_mxint8_follows_the_spec_rule_element_by_element():
    """MXINT8: X = 2^(floor(log2 amax)) (emax 0), P = code / 64, codes saturate at ±127."""
    x = adversarial("int8")
    q = quantize(x, QuantSpec("int8", "group", 32, scale_dtype="mx"))
    levels = get_format("int8").decode(q.codes).reshape(-1, 32)
    for b, block in enumerate(x.reshape(-1, 32).tolist()):
        amax = max(abs(v) for v in block)
        e = max(-127, math.frexp(amax)[1] - 1) if amax > 0 else -127
        want = [max(-127, min(127, round(v / 2.0 ** e * 64))) for v in block]   # round(): ties to even
        assert levels[b].tolist() == want
        assert int(mx.mx_scale_codes(q.scale.reshape(-1)[b:b + 1], get_format("int8"))) == e + 127


def test_nvfp4_codes_and_block_scales_equal_torchao():
    """Two-level NVFP4: torchao's per-tensor scale t = amax / (448 * 6) is the inverse of lowbit's (and
    compressed-tensors') global scale G; E4M3 block scales and E2M1 codes agree bit for bit."""
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    torch.manual_seed(1)
    x = torch.randn(48, 256) * torch.logspace(-4, 2, 48)[:, None]
    x[3] = 0.0                                           # zero blocks: the smallest normal E4M3 scale
    x[4, :16] = 1e-30                                    # a block far below the tensor's amax: clamped scale
    t = nv.per_tensor_amax_to_scale(x.abs().max())
    ref_scales, ref_data = nv.nvfp4_quantize(x.contiguous(), 16, t)
    q = quantize(x, QuantSpec("fp4_e2m1", "group", 16, scale_dtype="nv"))
    block = mx.nv_recover_block_scales(q.scale, q.extras["global_scale"])
    assert torch.equal(block.view(torch.uint8), ref_scales.view(torch.uint8).reshape(block.shape))
    assert torch.equal(q.codes, kernels.unpack_uint4(ref_data).reshape(q.codes.shape))


def test_nvfp4_effective_scale_gives_back_the_block_scale_exactly():
    torch.manual_seed(2)
    x = torch.randn(64, 512) * torch.logspace(-6, 6, 64)[:, None]
    q = quantize(x, QuantSpec("fp4_e2m1", "group", 16, scale_dtype="nv"))
    g = q.extras["global_scale"]
    s = mx.nv_recover_block_scales(q.scale, g).float()
    assert torch.equal(s / g, q.scale)


def test_mx_and_nv_scales_refuse_a_zero_point():
    with pytest.raises(LowbitError):
        QuantSpec("uint8", "group", 32, symmetric=False, scale_dtype="mx")
