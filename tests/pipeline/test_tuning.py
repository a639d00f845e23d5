"""Block fine-tuning (pipeline/tuning.py): AQLM's codebooks / scales and QuIP#'s scale train through their
modules' forward passes, the block's error against the full-precision outputs falls, and a tuning that does
not help is undone."""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.methods import parse_method
from lowbit.methods.aqlm import AQLM
from lowbit.nn import AQLMLinear, QuipLinear
from lowbit.pipeline.arch import block_list, describe
from lowbit.pipeline.blocks import capture_block_inputs
from lowbit.pipeline.tuning import block_error, block_targets, tune_block
from tests.conftest import build_tiny_model

GEN = torch.Generator().manual_seed(0)
CALIB = torch.randint(0, 512, (32, 32), generator=GEN)
HELD_OUT = torch.randint(0, 512, (4, 32), generator=GEN)


def _logit_error(model, ref_model, ids=HELD_OUT) -> float:
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref_model(input_ids=ids).logits
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def test_the_tuned_forward_is_the_stored_forward(one_thread):
    """Entering tuning changes nothing: the float32 masters decode to the stored weight."""
    base = build_tiny_model("llama").eval()
    q = api.quantize(copy.deepcopy(base), AQLM(codebooks=1, rounds=0), calibration=CALIB, progress=False)
    for m in q.modules():
        if isinstance(m, (AQLMLinear, QuipLinear)):
            x = torch.randn(3, m.in_features, generator=GEN)
            with torch.no_grad():
                y = m(x)
                masters = m.tuning_start()
                assert all(t.requires_grad for t in masters)
                assert torch.allclose(m(x), y, rtol=0, atol=1e-6)
                m.tuning_end()
                assert torch.equal(m(x), y)   # nothing trained: the stored values are unchanged


@pytest.mark.parametrize("method, gain", [("aqlm-1x8-r0", 0.6)])
def test_tuning_lowers_the_held_out_logit_error(method, gain, one_thread):
    """AQLM's codebooks carry most of its weight: tuning them about halves the logit error on tokens it
    did not see (measured 0.067 -> 0.034 with one thread)."""
    base = build_tiny_model("llama").eval()
    plain = api.quantize(copy.deepcopy(base), parse_method(method), calibration=CALIB, progress=False)
    tuned = api.quantize(copy.deepcopy(base), parse_method(f"{method}-ft20-ftlr0.003"), calibration=CALIB,
                         progress=False)
    assert _logit_error(tuned, base) < gain * _logit_error(plain, base)
    # what trained: the continuous parameters; the codes are the untuned run's
    for (n, a), (_, b) in zip(plain.named_modules(), tuned.named_modules()):
        if isinstance(a, (AQLMLinear, QuipLinear)):
            assert torch.equal(a.codes, b.codes), n
    moved = [n for (n, a), (_, b) in zip(plain.state_dict().items(), tuned.state_dict().items())
             if a.is_floating_point() and not torch.equal(a, b)]
    assert any("norm" in n for n in moved) and any(n.endswith("scales") or n.endswith("scale") for n in moved)


def test_tune_block_never_returns_a_worse_block(one_thread):
    """A learning rate far too large makes the trained block worse: it is put back as quantised."""
    base = build_tiny_model("llama").eval()
    q = api.quantize(copy.deepcopy(base), AQLM(codebooks=1, rounds=0), calibration=CALIB, progress=False)
    _, blocks = block_list(q, describe(q))
    fp_blocks = block_list(base, describe(base))[1]
    inputs = capture_block_inputs(base, fp_blocks[:1], [CALIB[:4], CALIB[4:8]])
    targets = block_targets(fp_blocks[0], inputs)
    state = {k: v.clone() for k, v in blocks[0].state_dict().items()}
    before, after = tune_block(blocks[0], inputs, targets, epochs=3, lr=10.0)
    assert after == before == pytest.approx(block_error(blocks[0], inputs, targets))
    assert all(torch.equal(v, blocks[0].state_dict()[k]) for k, v in state.items())
    good_before, good_after = tune_block(blocks[0], inputs, targets, epochs=10, lr=1e-3)
    assert good_after < good_before == pytest.approx(before)
    assert good_after == pytest.approx(block_error(blocks[0], inputs, targets))


def test_tuning_words_and_checks():
    assert parse_method("aqlm-ft5") == AQLM(finetune=5) and AQLM(finetune=5).short_name() == "aqlm-ft5"
    assert AQLM(finetune=5).block_tuning == (5, AQLM().finetune_lr) and AQLM().block_tuning[0] == 0
    assert parse_method("quip-ft2").block_tuning[0] == 2
    with pytest.raises(LowbitError, match="finetune"):
        AQLM(finetune=-1)
    with pytest.raises(LowbitError, match="finetune"):
        AQLM(finetune_lr=0.0)


def test_quip_signs_tuned_to_real_values_are_stored_fp16_and_counted(one_thread):
    """QuIP#'s fine-tuning trains SU / SV as real numbers: a tuned module stores them as fp16 vectors, its
    bits per weight count 16 per sign, and its forward pass is the dequantised weight's."""
    base = build_tiny_model("llama").eval()
    tuned = api.quantize(copy.deepcopy(base), parse_method("quip-ft20-ftlr0.003"), calibration=CALIB, progress=False)
    mods = [m for m in tuned.modules() if isinstance(m, QuipLinear)]
    real = [m for m in mods if m.real_signs]
    assert real, "no block kept its tuning"
    for m in real:
        su, sv = m.signs()
        assert m.su.dtype == torch.float16 and m.su.shape == (m.in_features,)
        assert not bool(((su.abs() - 1).abs() < 1e-3).all())   # no longer signs
        q = m.quantized()
        n_in, out = m.in_features, m.out_features
        assert q.storage_bits == 16 * q.codes.numel() + 16 * (n_in + out) + 32
        x = torch.randn(5, n_in, generator=GEN)
        with torch.no_grad():
            assert torch.allclose(m(x), x @ q.dequantize().T, atol=1e-5, rtol=1e-4)
