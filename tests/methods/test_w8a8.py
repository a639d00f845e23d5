"""W8A8: the integer matmul, the W8A8Linear epilogue, the method in the pipeline, save/load."""
import numpy as np
import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.kernels.int8 import MAX_K, default_backend, int8_matmul, quantize_rows, quantize_with_scale
from lowbit.methods import parse_method
from lowbit.methods.awq import AWQ
from lowbit.methods.w8a8 import W8A8, int8_weight
from lowbit.nn.w8a8 import W8A8Linear
from tests.conftest import build_tiny_model

GEN = torch.Generator().manual_seed(0)


def rand_int8(*shape):
    return torch.randint(-128, 128, shape, generator=GEN, dtype=torch.int8)


@pytest.mark.parametrize("backend", ["int_mm", "reference"])
@pytest.mark.parametrize("shape", [(1, 7, 5), (33, 256, 768), (4, 3, 64, 96)])
def test_int8_matmul_equals_int64_accumulation(backend, shape):
    *lead, k, n = shape
    a, w = rand_int8(*lead, k), rand_int8(n, k)
    expected = np.asarray(a.numpy(), dtype=np.int64) @ np.asarray(w.numpy(), dtype=np.int64).T
    out = int8_matmul(a, w, backend)
    assert out.dtype == torch.int32 and tuple(out.shape) == (*lead, n)
    assert np.array_equal(out.numpy().astype(np.int64), expected)


@pytest.mark.parametrize("backend", ["int_mm", "reference"])
def test_int8_matmul_is_exact_at_the_extremes(backend):
    """-128 * -128 summed over a long row: 4096 * 16384 = 2^26, exact in int32 accumulation."""
    a = torch.full((3, 4096), -128, dtype=torch.int8)
    w = torch.full((8, 4096), -128, dtype=torch.int8)
    w[1] = 127
    out = int8_matmul(a, w, backend)
    assert int(out[0, 0]) == 4096 * 16384 and int(out[0, 1]) == -4096 * 128 * 127


def test_int8_matmul_rejects_overflowing_or_mismatched_operands():
    with pytest.raises(LowbitError, match="overflow"):
        int8_matmul(torch.zeros(1, MAX_K + 1, dtype=torch.int8), torch.zeros(1, MAX_K + 1, dtype=torch.int8))
    with pytest.raises(LowbitError, match="int8"):
        int8_matmul(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.int8))


def test_cpu_backend_choice_is_stated():
    assert default_backend(torch.zeros(2, 4, dtype=torch.int8), torch.zeros(3, 4, dtype=torch.int8)) in (
        "int_mm", "reference")


def test_per_token_activation_codes_match_the_closed_form():
    x = torch.randn(16, 64, generator=GEN) * torch.linspace(0.1, 20, 16)[:, None]
    x[3] = 0.0
    codes, scale = quantize_rows(x)
    xn = x.numpy().astype(np.float64)
    amax = np.abs(xn).max(1)
    expected_scale = np.where(amax > 0, amax / 127, 1.0)
    assert np.allclose(scale.numpy(), expected_scale, rtol=1e-6)
    expected = np.clip(np.round(xn / expected_scale[:, None]), -127, 127)   # numpy rounds half to even too
    assert np.abs(codes.numpy().astype(np.int64) - expected).max() <= 1     # float32 vs float64 at a half
    assert float((codes.int() - torch.from_numpy(expected).int()).abs().float().mean()) < 1e-3
    assert codes.abs().amax(1)[torch.arange(16) != 3].eq(127).all()


def test_static_activation_codes_saturate():
    codes = quantize_with_scale(torch.tensor([[0.0, 1.0, 1000.0, -1000.0, 0.5]]), torch.tensor(0.01))
    assert codes.tolist() == [[0, 100, 127, -128, 50]]


@pytest.mark.parametrize("activation", ["token", "tensor"])
def test_w8a8_linear_integer_path_matches_float_reference_of_same_values(activation):
    w = torch.randn(48, 96, generator=GEN) * 0.05
    bias = torch.randn(48, generator=GEN)
    x = torch.randn(2, 10, 96, generator=GEN)
    q = int8_weight(w)
    m = W8A8Linear.from_quantized(q, bias, activation, input_scale=float(x.abs().max()) / 127)
    x_codes, x_scale = m.quantize_input(x.reshape(-1, 96))
    # the integer accumulator equals float64 arithmetic on the same integer values, bit for bit
    acc = int8_matmul(x_codes, m.weight)
    exact = (x_codes.double() @ m.weight.double().T)
    assert torch.equal(acc.double(), exact)
    # and the epilogue applies both scales and the bias
    reference = exact * x_scale.double()[:, None] * m.weight_scale.double() + bias.double()
    out = m(x).reshape(-1, 48)
    assert torch.allclose(out.double(), reference, rtol=1e-6, atol=1e-6)
    # the weight codes are absmax/127 per row; the output is close to the float layer
    assert torch.allclose(m.dequantized_weight(), w, atol=float(w.abs().max()) / 127 / 2 + 1e-7)
    assert float((out - (x.reshape(-1, 96) @ w.T + bias)).norm() / out.norm()) < 0.02


def test_int_mm_and_reference_give_identical_module_outputs():
    m = W8A8Linear.from_quantized(int8_weight(torch.randn(32, 64, generator=GEN)))
    x = torch.randn(20, 64, generator=GEN)
    m.backend = "int_mm"
    a = m(x)
    m.backend = "reference"
    assert torch.equal(a, m(x))


def test_static_method_needs_calibration():
    with pytest.raises(LowbitError, match="calibration"):
        W8A8(activation="tensor").quantize_weight(torch.randn(8, 16), None)
    with pytest.raises(LowbitError, match="token"):
        W8A8(activation="channel")


def test_short_names():
    assert parse_method("w8a8") == W8A8("token") and parse_method("w8a8-static") == W8A8("tensor")
    assert W8A8("tensor").short_name() == "w8a8-static"
    with pytest.raises(LowbitError):
        parse_method("w8a8-fast")


@pytest.mark.parametrize("name", ["w8a8", "w8a8-static"])
def test_pipeline_quantises_and_native_format_reloads(name, tmp_path, tiny_tokenizer):
    model = build_tiny_model("llama")
    ids = torch.randint(0, 512, (2, 32), generator=GEN)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    api.quantize(model, parse_method(name), tokenizer=tiny_tokenizer, n_samples=8, seq_len=64, progress=False)
    mods = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(mods) == 14
    with torch.no_grad():
        out = model(input_ids=ids).logits
    # int8 weights and activations on a random tiny model: a few per cent of the logits at most
    assert float((out - ref).norm() / ref.norm()) < 0.08
    api.save(model, tmp_path / "m", tokenizer=tiny_tokenizer)
    loaded, _ = api.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, out)


@pytest.mark.parametrize("method, expected", [("w8a8", W8A8("token")), ("w8a8-static", W8A8("tensor")),
                                              ("llm-int8", "LLMInt8(threshold=6.0)"),
                                              ("smoothquant", "SmoothQuant(activation='token', alpha=0.5"),
                                              ("awq", AWQ(bits=3))])
def test_cli_method_names(method, expected):
    from lowbit.cli import build_parser
    from lowbit.pipeline.cli import method_from_args

    extra = ["--bits", "3"] if method == "awq" else []
    config = method_from_args(build_parser().parse_args(["quantize", "--method", method, *extra, "-o", "x"]))
    assert config == expected if not isinstance(expected, str) else repr(config).startswith(expected)


def test_cli_quantize_and_reload_w8a8(tmp_path, tiny_model_dir, capsys):
    from lowbit.cli import main

    rc = main([str(a) for a in ("quantize", tiny_model_dir("llama"), "--method", "w8a8-static", "--samples", "4",
                                "--seq-len", "32", "--quiet", "-o", tmp_path / "q")])
    assert rc == 0, capsys.readouterr().err
    model, _ = api.load(tmp_path / "q")
    mods = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(mods) == 14 and all(m.activation == "tensor" and float(m.input_scale) > 0 for m in mods)
