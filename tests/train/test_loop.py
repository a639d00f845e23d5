"""The shared training loop: schedule, resume after an interruption gives the uninterrupted run's losses,
checkpoints of another run refused."""
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.train.loop import History, LoopSettings, batch_at, latest_checkpoint, lr_at, train_loop, write_loss_curve
from tests.train.helpers import interrupted_at


def _model():
    import transformers as t

    torch.manual_seed(0)
    config = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=64, vocab_size=97)
    return t.LlamaForCausalLM(config)


IDS = torch.arange(4000) * 7 % 97
SETTINGS = LoopSettings(steps=6, lr=1e-2, batch_size=2, seq_len=16, warmup=2, checkpoint_every=2, eval_every=3,
                        log_every=0)


def test_schedule_warms_up_then_decays_to_the_floor():
    s = LoopSettings(steps=10, lr=1.0, warmup=2, min_lr_ratio=0.1)
    assert [lr_at(i, s) for i in range(2)] == [0.5, 1.0]
    assert lr_at(2, s) == pytest.approx(1.0) and lr_at(10, s) == pytest.approx(0.1)
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(2, 10))
    assert torch.equal(batch_at(IDS, 3, s), batch_at(IDS, 3, s))
    assert not torch.equal(batch_at(IDS, 3, s), batch_at(IDS, 4, s))


def test_resume_gives_the_uninterrupted_losses(tmp_path, one_thread):
    whole_model = _model()
    whole = train_loop(whole_model, whole_model.parameters(), IDS, SETTINGS, progress=False,
                       evaluate=lambda m: 1.0)

    model = _model()
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, model.parameters(), IDS, SETTINGS, checkpoint_dir=tmp_path, run={"m": 1},
                   progress=False, loss_fn=interrupted_at(5))
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    model = _model()
    resumed = train_loop(model, model.parameters(), IDS, SETTINGS, checkpoint_dir=tmp_path, run={"m": 1},
                         progress=False)
    assert resumed.resumed_from == 4
    assert [loss for _, loss in resumed.losses] == [loss for _, loss in whole.losses]
    for a, b in zip(model.state_dict().values(), whole_model.state_dict().values()):
        assert torch.equal(a, b)
    assert len(list(tmp_path.glob("step-*"))) == 1   # older checkpoints removed

    with pytest.raises(LowbitError, match="another run"):
        train_loop(_model(), _model().parameters(), IDS, SETTINGS, checkpoint_dir=tmp_path, run={"m": 2},
                   progress=False)
    with pytest.raises(LowbitError, match="another run"):     # the same run on another text
        train_loop(_model(), _model().parameters(), IDS.flip(0), SETTINGS, checkpoint_dir=tmp_path, run={"m": 1},
                   progress=False)


def test_bad_settings_and_too_little_text_are_one_line_errors():
    with pytest.raises(LowbitError):
        LoopSettings(steps=0)
    with pytest.raises(LowbitError):
        LoopSettings(lr=float("nan"))
    m = _model()
    with pytest.raises(LowbitError, match="fewer than one window"):
        train_loop(m, m.parameters(), IDS[:10], SETTINGS, progress=False)


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    h = History(losses=[(i, 3.0 - 0.1 * i) for i in range(10)], evals=[(9, 2.5)])
    out = write_loss_curve(tmp_path / "loss.png", {"a": h, "b": h})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_or_negative_weight_decay_and_clipping_are_refused():
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(LowbitError, match="weight-decay"):
            LoopSettings(weight_decay=bad)
        with pytest.raises(LowbitError, match="max-grad-norm"):
            LoopSettings(max_grad_norm=bad)
    LoopSettings(weight_decay=0.0, max_grad_norm=0.0)   # 0: no decay, no clipping


def test_windows_longer_than_the_models_context_are_refused():
    m = _model()   # max_position_embeddings 64
    s = LoopSettings(steps=1, batch_size=1, seq_len=65, log_every=0)
    with pytest.raises(LowbitError, match="longer than the model's context"):
        train_loop(m, m.parameters(), IDS, s, progress=False)


def test_interrupt_names_the_checkpoint_to_resume_from(tmp_path, one_thread):
    m = _model()
    with pytest.raises(KeyboardInterrupt) as info:
        train_loop(m, m.parameters(), IDS, SETTINGS, checkpoint_dir=tmp_path, progress=False, loss_fn=interrupted_at(3))
    assert "resume from" in info.value.hint and "step-00000001" in info.value.hint
