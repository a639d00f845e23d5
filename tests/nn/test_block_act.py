"""W4A4 / MX activations: BlockActLinear's output equals a float64 reference written here from the
formats' definitions (OCP MX v1.0's scale rule; NVFP4's E4M3 block scale under the tensor scale G), its
activation codes and scales equal torchao's MX / NVFP4 references, and it reloads bit-identically."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit import api
from lowbit.core import mx
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.io.native import load, save
from lowbit.methods import parse_method
from lowbit.methods.stats import LayerStats
from lowbit.nn import BlockActLinear, module_for
from lowbit.nn.block_act import quantize_activations
from lowbit.weights import BlockActWeight
from tests.conftest import build_tiny_model
from tests.core.test_mx import torchao_mx

EMAX = {"fp4_e2m1": 2, "fp6_e2m3": 2, "fp6_e3m2": 4, "fp8_e4m3": 8, "fp8_e5m2": 15}


def round_to_grid(v: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """float64 values rounded to the element grid: nearest value, ties to the even code (the even mantissa),
    saturating at ± the largest value."""
    grid = get_format(fmt_name).values().double()
    pos = torch.sort(grid[grid >= 0].unique()).values          # 0, smallest subnormal, ..., max: codes 0..n
    a = v.abs().clamp(max=float(pos[-1]))
    i = torch.searchsorted(pos, a.contiguous()).clamp(1, len(pos) - 1)
    lo, hi = pos[i - 1], pos[i]
    up = (a - lo > hi - a) | ((a - lo == hi - a) & ((i - 1) % 2 == 1))
    return torch.sign(v) * torch.where(up, hi, lo)


def reference_fake_quant(x: torch.Tensor, fmt_name: str, block: int, rule: str, g: float | None = None):
    """decode(quantise(x)) in float64, blocks of `block` along the last dim: MX, X = 2^(floor(log2 amax) -
    emax); NVFP4, s = e4m3(clamp(amax / 6 * G, 2^-6, 448)) and the effective scale float32(s / G). The
    decoded values are rounded to float32, the precision the module multiplies in (exact for MX; an NVFP4
    level times a float32 s / G may need a 25th bit)."""
    b = x.double().reshape(x.shape[0], -1, block)
    amax = b.abs().amax(-1, keepdim=True)
    if rule == "mx":
        e = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))) - EMAX[fmt_name]
        scale = torch.where(amax > 0, 2.0 ** e.clamp(-127, 127), torch.full_like(amax, 2.0 ** -127))
    else:
        s = (amax / 6 * g).clamp(2.0 ** -6, 448.0).to(torch.float8_e4m3fn).double()
        scale = (s.float() / torch.tensor(g, dtype=torch.float32)).double()
    return (round_to_grid(b / scale, fmt_name) * scale).reshape(x.shape).float().double()


def calibrated(name: str, w: torch.Tensor, calib: torch.Tensor):
    stats = LayerStats(w.shape[1])
    stats.update(calib)
    return parse_method(name).quantize_weight(w, stats)


CASES = [("rtn-mxfp4-a4", "fp4_e2m1", 32, "mx"), ("rtn-nvfp4-a4", "fp4_e2m1", 16, "nv"),
         ("rtn-mxfp8_e4m3-a8", "fp8_e4m3", 32, "mx"), ("rtn-mxfp6_e2m3-a6", "fp6_e2m3", 32, "mx")]


@pytest.mark.parametrize("name,fmt,block,rule", CASES)
def test_output_equals_the_float64_reference_of_the_spec(name, fmt, block, rule):
    torch.manual_seed(0)
    w, calib = torch.randn(48, 128) * 0.05, torch.randn(64, 128) * 2
    x = torch.randn(2, 5, 128) * 2 * torch.logspace(-3, 1, 128)        # blocks at many magnitudes
    x[0, 0, :block] = 0.0                                                # an all-zero block
    x[1, 1, 3] = 50.0                                                    # beyond the calibrated amax: saturates
    bias = torch.randn(48)
    m = module_for(calibrated(name, w, calib), bias)
    assert isinstance(m, BlockActLinear)
    g_w = float(mx.nv_global_scale(w.abs().max())) if rule == "nv" else None
    w_ref = reference_fake_quant(w, fmt, block, rule, g_w)
    assert torch.equal(m.dequantized_weight().double(), w_ref)
    g_x = 448 * 6 / float(calib.abs().max()) if rule == "nv" else None
    if rule == "nv":
        assert math.isclose(float(m.input_global_scale), g_x, rel_tol=1e-6)
        g_x = float(m.input_global_scale)                               # the float32 value stored
    x_ref = reference_fake_quant(x.reshape(-1, 128), fmt, block, rule, g_x)
    assert torch.equal(quantize_activations(x.reshape(-1, 128), m.spec, m.input_global_scale).dequantize().double(),
                       x_ref)
    y_ref = (x_ref @ w_ref.T + bias.double()).reshape(2, 5, 48)
    torch.testing.assert_close(m(x).double(), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp8_e4m3", "fp6_e2m3"])
def test_mx_activation_codes_and_scales_equal_torchao(fmt):
    torch.manual_seed(1)
    x = torch.randn(24, 256) * torch.logspace(-4, 3, 24)[:, None]
    spec = parse_method(f"rtn-mx{fmt.replace('_e2m1', '')}").scheme
    q = quantize_activations(x, spec)
    ref_scale, ref_codes = torchao_mx(x.contiguous(), fmt)
    assert torch.equal(mx.mx_scale_codes(q.scale, q.spec.number_format), ref_scale)
    assert torch.equal(q.codes, ref_codes)


def test_nvfp4_activation_codes_and_scales_equal_torchao_under_the_calibrated_scale():
    """torchao's per-tensor scale t = amax / (448 * 6) is 1 / G_x; the amax is the calibration's, so tokens
    beyond it saturate their block scale (448) and elements (±6) in both."""
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    torch.manual_seed(2)
    x = torch.randn(32, 256) * torch.logspace(-3, 1, 32)[:, None]
    calib_amax = torch.tensor(4.0)
    q = quantize_activations(x, parse_method("rtn-nvfp4").scheme, mx.nv_global_scale(calib_amax))
    ref_scales, ref_data = nv.nvfp4_quantize(x.contiguous(), 16, nv.per_tensor_amax_to_scale(calib_amax))
    block = mx.nv_recover_block_scales(q.scale, q.extras["global_scale"])
    assert torch.equal(block.view(torch.uint8), ref_scales.view(torch.uint8).reshape(block.shape))
    assert torch.equal(q.codes, kernels.unpack_uint4(ref_data).reshape(q.codes.shape))
    assert (block.float() == 448).any() and (q.dequantize().abs() == 6 * q.scale.max()).any()


def test_words_calibration_and_mismatches_are_one_line_errors():
    w = torch.randn(16, 64)
    assert parse_method("gptq-nvfp4-a4").short_name() == "gptq-nvfp4-a4"
    assert parse_method("rtn-nvfp4-a4").required_stats == ("act_absmax",)
    assert parse_method("rtn-mxfp4-a4").required_stats == ()
    for bad in ("rtn-int4-g128-a4", "gptq-int4-g128-a4", "rtn-nvfp4-a8", "rtn-mxfp8_e4m3-a4", "rtn-fp8_e4m3-a8"):
        with pytest.raises(LowbitError, match="block-format activations"):
            parse_method(bad)
    with pytest.raises(LowbitError, match="needs calibration data"):
        parse_method("rtn-nvfp4-a4").quantize_weight(w, None)
    with pytest.raises(LowbitError, match="needs calibration data"):
        parse_method("gptq-nvfp4-a4").quantize_weight(w, None)
    held = module_for(parse_method("rtn-mxfp4-a4").quantize_weight(w)).quantized()
    assert isinstance(held, BlockActWeight) and held.input_global_scale is None


@pytest.mark.parametrize("method", ["rtn-nvfp4-a4", "gptq-mxfp4-a4"])
def test_reload_gives_identical_logits(tmp_path, tiny_tokenizer, method, one_thread):
    model = build_tiny_model("llama")
    api.quantize(model, method, tokenizer=tiny_tokenizer, n_samples=2, seq_len=32, progress=False)
    assert any(isinstance(m, BlockActLinear) for m in model.modules())
    loaded, _ = load(save(model, tmp_path / "q", tokenizer=tiny_tokenizer))
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    ours = {n: m.quantized() for n, m in model.named_modules() if isinstance(m, BlockActLinear)}
    theirs = {n: m.quantized() for n, m in loaded.named_modules() if isinstance(m, BlockActLinear)}
    assert ours.keys() == theirs.keys()
    for n, w in ours.items():
        assert w.input_global_scale == theirs[n].input_global_scale
        assert torch.equal(w.dequantize(), theirs[n].dequantize())
