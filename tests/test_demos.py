"""Each figure of `lowbit demo basics` against its closed form."""
import math

import pytest

from lowbit.demos import int8_weight_exercise, kv_cache_exercise, outlier_exercise


def test_int8_exercise_figures():
    r = int8_weight_exercise()
    n = 1024 * 1024
    assert r["size_ratio"] == pytest.approx(4 * n / (n + 4))  # n int8 codes + one fp32 scale
    s = r["scale"]
    assert r["max_abs_error"] <= s / 2
    # rounding error is uniform on [-s/2, s/2]: E|e| = s/4, RMS = s/sqrt(12)
    assert r["mean_abs_error"] == pytest.approx(s / 4, rel=0.02)
    assert r["relative_error"] == pytest.approx(s / math.sqrt(12) / 0.02, rel=0.02)


def test_outlier_exercise_per_channel_far_below_per_tensor():
    r = outlier_exercise()
    assert r["improvement"] > 100
    # per-tensor: the scale is set by the x100 channel, about 10/127 per step at 3-4 sigma
    assert r["per_tensor_zeroed_fraction"] > 0.5
    assert r["per_channel_mse"] < r["per_token_mse"] < r["per_tensor_mse"]


def test_kv_table_figures():
    rows = {(r["model"][:3].strip(), r["seq_len"], r["dtype"]): r for r in kv_cache_exercise()}
    assert rows[("7B", 4096, "fp16")]["gib"] == 2
    assert rows[("70B", 131072, "fp16")]["gib"] == 40
    assert rows[("70B", 131072, "int4")]["gib"] == 10
    assert len(rows) == 2 * 3 * 3


def test_gaussian_mse_table_matches_the_literature_within_3_percent():
    """NF4 g64 0.0085, INT4 asym g64 0.0083, FP4 g64 0.0112, MXFP4 0.0133 (unit Gaussian, absmax scales)."""
    from lowbit.demos import RATE_DISTORTION_4BIT, gaussian_mse, render_formats

    rows = {label: (bpw, mse, known) for label, bpw, mse, known in gaussian_mse()}
    checked = [(label, mse, known) for label, (_, mse, known) in rows.items() if known is not None]
    assert len(checked) == 4
    for label, mse, known in checked:
        assert abs(mse - known) <= 0.03 * known, (label, mse, known)
    assert rows["MXFP4 (E2M1 b32, E8M0)"][0] == 4.25 and rows["NVFP4 (E2M1 b16, E4M3 + FP32)"][1] < rows["MXFP4 (E2M1 b32, E8M0)"][1]
    assert all(mse > RATE_DISTORTION_4BIT for label, (bpw, mse, _) in rows.items() if bpw < 5)
    assert "MXFP4" in render_formats() and "rate-distortion" in render_formats()
