"""FP8 training: delayed scaling against hand-computed sequences, the FP8 linear against a reference built
from lowbit's own FP8 grids (float64 arithmetic), the loss scaler on inf gradients, conversion, resume."""
import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.train.fp8_linear import GRAD_OUTPUT, INPUT, WEIGHT, Fp8Linear, convert_to_fp8_training
from lowbit.train.fp8_scaling import DelayedScaling, record_amax
from tests.train.helpers import interrupted_at

pytestmark = pytest.mark.usefixtures("one_thread")
E4M3, E5M2 = get_format("fp8_e4m3"), get_format("fp8_e5m2")

# amaxes fed one step at a time; step 1's amax (8) exceeds what its scale (224, from step 0's amax 2)
# can hold: 8 * 224 = 1792 > 448.
AMAXES = [2.0, 8.0, 1.0, 1.0, 1.0, 0.5]
# scale used at each step, by hand (E4M3 max 448, history length 3, scale = 448 / amax / 2**margin):
#   step 0: no history -> 1 (TE's initial scale);  after 2: 448/2 = 224
#   step 1: 224; window (2, 8) -> 448/8 = 56;      step 2: 56; window (2, 8, 1) -> 56
#   step 3: 56; window (8, 1, 1) -> 56;            step 4: 56; window (1, 1, 1) -> 448
#   step 5: 448
SCALES_MAX = [1.0, 224.0, 56.0, 56.0, 56.0, 448.0]
# "most_recent": only the newest amax counts: 1, 448/2, 448/8, 448/1, 448/1, 448/1
SCALES_RECENT = [1.0, 224.0, 56.0, 448.0, 448.0, 448.0]


def _feed(recipe, amaxes):
    history, scale, used = torch.zeros(recipe.amax_history_len, 3), torch.ones(3), []
    for a in amaxes:
        used.append(float(scale[INPUT]))
        record_amax(history, scale, INPUT, torch.tensor([a, -a / 4]), 448.0, recipe)
    return used, history, scale


@pytest.mark.parametrize("recipe, expected", [
    (DelayedScaling(amax_history_len=3), SCALES_MAX),
    (DelayedScaling(amax_history_len=3, margin=1), [1.0] + [s / 2 for s in SCALES_MAX[1:]]),
    (DelayedScaling(amax_history_len=3, amax_compute_algo="most_recent"), SCALES_RECENT),
])
def test_delayed_scales_follow_the_hand_computed_sequence(recipe, expected):
    used, history, scale = _feed(recipe, AMAXES)
    assert used == expected
    assert history[1:, INPUT].tolist() == [0.5, 1.0] and history[0, INPUT] == 0   # newest first, slot 0 cleared
    assert scale[WEIGHT] == 1 and scale[GRAD_OUTPUT] == 1                         # other columns untouched


def test_the_module_saturates_an_overflowing_step_and_the_next_scale_adapts():
    lin = Fp8Linear(2, 1, bias=False, recipe=DelayedScaling(amax_history_len=3)).train()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0]]))   # y = x[:, 0] (weight amax 1: its scale is 448 after step 0)
    outputs = []
    for a in AMAXES:
        x = torch.tensor([[a, a / 4]], requires_grad=True)
        y = lin(x)
        y.sum().backward()
        outputs.append(float(y.detach()))
    # step 1: 8 * 224 saturates at 448, which decodes to 448 / 224 = 2: clipped, not inf
    # the others: a * scale lands on the E4M3 grid; unscaling multiplies by float32 reciprocals (as TE's
    # scale_inv does), so "exact" is to an ulp
    assert outputs == pytest.approx([2.0, 2.0, 1.0, 1.0, 1.0, 0.5], rel=1e-6)
    assert float(lin.fp8_scale[INPUT]) == 448.0 and float(lin.fp8_scale[WEIGHT]) == 448.0   # window (1, 1, .5)


def test_non_finite_or_zero_amax_keeps_the_scale():
    recipe = DelayedScaling(amax_history_len=2)
    used, history, scale = _feed(recipe, [0.0, 4.0, float("inf"), float("inf"), float("inf")])
    # zero history -> 1 kept; 448/4 = 112; inf is recorded as 0, so the window (4, 0) still gives 112,
    # then (0, 0): the amax is 0 and the scale is kept (TE: amax 0 -> previous scale)
    assert used == [1.0, 1.0, 112.0, 112.0, 112.0]


def test_bad_recipes_are_one_line_errors():
    for kw in ({"amax_history_len": 0}, {"margin": -1}, {"margin": 0.5}, {"amax_compute_algo": "mean"}):
        with pytest.raises(LowbitError):
            DelayedScaling(**kw)
    with pytest.raises(LowbitError, match="backend"):
        Fp8Linear(4, 4, backend="cublas")


def _trained_linear(k=32, n=24, steps=3, backend="emulated", seed=0):
    """An Fp8Linear after a few training passes, so its three scales are no longer 1."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = Fp8Linear(k, n, recipe=DelayedScaling(amax_history_len=4), backend=backend).train()
    for _ in range(steps):
        x = torch.randn(5, k, generator=g) * 3
        lin(x).pow(2).sum().mul(1e-3).backward()
    lin.zero_grad(set_to_none=True)
    return lin, g


def _ref(values, scale, fmt):
    """values * scale (a float32 product, as the cast sees it) rounded by lowbit's FloatFormat (float64
    arithmetic, its own saturation), returned in float64 for the reference matmul."""
    return fmt.round(values.float() * scale).double()


def _close(actual, expected):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_forward_equals_the_hand_built_reference():
    lin, g = _trained_linear()
    x = torch.randn(2, 3, 32, generator=g) * 3
    s_x, s_w = float(lin.fp8_scale[INPUT]), float(lin.fp8_scale[WEIGHT])
    assert s_x != 1 and s_w != 1
    ref = _ref(x.reshape(6, 32), s_x, E4M3) @ _ref(lin.weight.detach(), s_w, E4M3).T / (s_x * s_w)
    ref = (ref + lin.bias.detach().double()).reshape(2, 3, 24)
    y = lin(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    _close(y, ref)   # float32 sums vs float64 ones


def test_backward_quantises_grad_output_to_e5m2():
    lin, g = _trained_linear()
    x = (torch.randn(7, 32, generator=g) * 3).requires_grad_()
    s_x, s_w, s_g = (float(lin.fp8_scale[c]) for c in (INPUT, WEIGHT, GRAD_OUTPUT))
    dy = torch.randn(7, 24, generator=g) * 1e-3
    lin(x).backward(dy)
    gq = _ref(dy, s_g, E5M2)
    assert not torch.equal(gq, _ref(dy, s_g, E4M3))   # the two grids differ on this input
    _close(x.grad, gq @ _ref(lin.weight.detach(), s_w, E4M3) / (s_g * s_w))
    _close(lin.weight.grad, gq.T @ _ref(x.detach(), s_x, E4M3) / (s_g * s_x))
    torch.testing.assert_close(lin.bias.grad, dy.sum(0))   # bias gradient in high precision
    assert lin.weight.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32   # master weights


def test_scaled_mm_backend_matches_the_emulation():
    try:
        torch._scaled_mm(torch.ones(16, 16, dtype=torch.float8_e4m3fn), torch.ones(16, 16, dtype=torch.float8_e4m3fn).t(),
                         scale_a=torch.ones(()), scale_b=torch.ones(()), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, AttributeError):
        pytest.skip("torch._scaled_mm does not run on this build")
    grads = []
    for backend in ("emulated", "scaled_mm"):
        lin, g = _trained_linear(k=16, n=16, steps=2, backend=backend)
        x = (torch.randn(16, 16, generator=g)).requires_grad_()
        y = lin(x)
        y.backward(torch.randn(16, 16, generator=g) * 1e-2)
        grads.append((y.detach(), x.grad, lin.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_loss_scaler_halves_and_skips_the_step_on_inf_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    model[0] = Fp8Linear.from_linear(model[0], DelayedScaling(amax_history_len=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=1000)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 8)
    scaler.scale(model(x).sum() * 1e3).backward()   # d(loss)/d(sum) = 2**127 * 1e3: inf in float32
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 126                                   # halved
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # step skipped
    assert model[0].fp8_amax_history[:, GRAD_OUTPUT].eq(0).all()             # the inf amax not recorded
    assert model[0].fp8_scale[GRAD_OUTPUT] == 1
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(model(x).abs().sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # finite: stepped
    assert model[0].fp8_scale[GRAD_OUTPUT] != 1                                     # and the scale adapted


def test_conversion_keeps_embeddings_and_lm_head_and_refuses_a_model_without_linears():
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama")
    names = convert_to_fp8_training(model)
    assert len(names) == 2 * 7 and names[0] == "model.layers.0.self_attn.q_proj"
    assert type(model.lm_head) is nn.Linear
    assert "model.layers.1.mlp.down_proj.fp8_amax_history" in model.state_dict()
    with pytest.raises(LowbitError):
        convert_to_fp8_training(nn.Sequential(nn.ReLU()))


def test_interrupted_fp8_training_resumes_with_the_amax_histories(tmp_path):
    from tests.conftest import build_tiny_model
    from lowbit.train.loop import LoopSettings, latest_checkpoint, train_loop

    ids = torch.arange(3000) * 7 % 500
    settings = LoopSettings(steps=4, lr=1e-2, batch_size=2, seq_len=16, warmup=1, checkpoint_every=2, log_every=0)

    def fp8_model():
        m = build_tiny_model("llama").train()
        convert_to_fp8_training(m, DelayedScaling(amax_history_len=3))
        return m

    whole = fp8_model()
    h_whole = train_loop(whole, whole.parameters(), ids, settings, progress=False)
    with pytest.raises(KeyboardInterrupt):
        m = fp8_model()
        train_loop(m, m.parameters(), ids, settings, checkpoint_dir=tmp_path, progress=False, loss_fn=interrupted_at(4))
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    m = fp8_model()
    h = train_loop(m, m.parameters(), ids, settings, checkpoint_dir=tmp_path, progress=False)
    assert h.resumed_from == 2 and [v for _, v in h.losses] == [v for _, v in h_whole.losses]
    for (k, a), b in zip(m.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(a, b), k   # parameters and the FP8 amax histories and scales
