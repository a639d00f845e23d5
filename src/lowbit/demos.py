"""The worked exercises every quantisation course starts with, each returning its figures as data."""
from __future__ import annotations

import torch

from lowbit.calc import kv_cache_memory, weight_table
from lowbit.core import QuantSpec, quantize
from lowbit.formats import get_format
from lowbit.table import format_table

# Llama-2-7B (full multi-head attention) and Llama-2/3-70B (grouped-query attention, 8 KV heads).
KV_MODELS = {"7B (32 layers, 32 KV heads)": (32, 32, 128), "70B (80 layers, 8 KV heads)": (80, 8, 128)}
KV_LENGTHS = (4096, 32768, 131072)
KV_DTYPES = ("fp16", "int8", "int4")


def int8_weight_exercise(seed: int = 0, n: int = 1024, std: float = 0.02) -> dict:
    """Symmetric per-tensor INT8 of an n x n N(0, std) FP32 matrix."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=gen) * std
    q = quantize(w, QuantSpec("int8", granularity="tensor", scale_dtype="fp32"))
    err = (w - q.dequantize()).abs()
    return {
        "shape": [n, n], "scale": float(q.scale), "fp32_bytes": w.numel() * 4, "int8_bytes": q.nbytes,
        "size_ratio": w.numel() * 4 / q.nbytes, "mean_abs_error": float(err.mean()),
        "max_abs_error": float(err.max()), "relative_error": float((w - q.dequantize()).norm() / w.norm()),
    }


def outlier_exercise(seed: int = 0, tokens: int = 32, channels: int = 512) -> dict:
    """INT8 of activations N(0, 0.1) whose channels 0 and 1 are scaled x100 and x50.

    Per-tensor: one scale stretched by the outliers leaves the other channels a handful of levels.
    Per-channel (a scale per feature column): each channel keeps its own resolution. Per-token
    (a scale per row) does not help, since every token carries the outlier channels.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=gen) * 0.1
    x[:, 0] *= 100
    x[:, 1] *= 50

    def mse(q: torch.Tensor) -> float:
        return float((x - q).pow(2).mean())

    spec = dict(format="int8", scale_dtype="fp32")
    per_tensor = quantize(x, QuantSpec(granularity="tensor", **spec)).dequantize()
    per_token = quantize(x, QuantSpec(granularity="token", **spec)).dequantize()
    per_channel = quantize(x.T.contiguous(), QuantSpec(granularity="channel", **spec)).dequantize().T
    normal = slice(2, None)
    return {
        "per_tensor_mse": mse(per_tensor), "per_token_mse": mse(per_token), "per_channel_mse": mse(per_channel),
        "per_tensor_mse_normal_channels": float((x[:, normal] - per_tensor[:, normal]).pow(2).mean()),
        "per_channel_mse_normal_channels": float((x[:, normal] - per_channel[:, normal]).pow(2).mean()),
        "per_tensor_zeroed_fraction": float((per_tensor[:, normal] == 0).float().mean()),
        "improvement": mse(per_tensor) / mse(per_channel),
    }


def kv_cache_exercise() -> list[dict]:
    rows = []
    for model, (layers, kv_heads, head_dim) in KV_MODELS.items():
        for seq in KV_LENGTHS:
            for dtype in KV_DTYPES:
                size = kv_cache_memory(layers, kv_heads, head_dim, seq, 1, dtype)
                rows.append({"model": model, "seq_len": seq, "dtype": dtype, "gb": size.gb, "gib": size.gib})
    return rows


def render_basics() -> str:
    a = int8_weight_exercise()
    b = outlier_exercise()
    kv = kv_cache_exercise()
    out = ["Exercise 1: symmetric INT8 (per tensor) of a 1024x1024 N(0, 0.02) FP32 matrix",
           # each row is another quantity: formatted one by one, not at the column's one precision
           format_table(["figure", "value"], [
               ["scale (amax/127)", f"{a['scale']:.4g}"],
               ["size FP32 -> INT8", f"{a['fp32_bytes']:,} -> {a['int8_bytes']:,} bytes"],
               ["size ratio", f"{a['size_ratio']:.4g}"], ["mean |error|", f"{a['mean_abs_error']:.4g}"],
               ["max |error| (<= scale/2)", f"{a['max_abs_error']:.4g}"],
               ["relative error ||W-Q||/||W||", f"{a['relative_error']:.4g}"]]),
           "",
           "Exercise 2: the outlier problem (activations 32x512 N(0, 0.1), channels 0 and 1 scaled x100 and x50)",
           format_table(["granularity", "MSE (all)", "MSE (normal channels)"], [
               ["per-tensor", b["per_tensor_mse"], b["per_tensor_mse_normal_channels"]],
               ["per-token", b["per_token_mse"], "-"],
               ["per-channel", b["per_channel_mse"], b["per_channel_mse_normal_channels"]]]),
           f"per-channel error is {b['improvement']:,.0f}x below per-tensor; per-tensor rounds "
           f"{100 * b['per_tensor_zeroed_fraction']:.0f}% of the normal channels' values to zero.",
           "",
           "Exercise 3: KV-cache size (batch 1) = 2 x layers x kv_heads x head_dim x tokens x bytes",
           format_table(["model", "tokens", "dtype", "GB", "GiB"],
                        [[r["model"], r["seq_len"], r["dtype"], r["gb"], r["gib"]] for r in kv])]
    return "\n".join(out)


# (label, scheme, literature MSE on unit Gaussian weights or None): each format at its natural block size
GAUSSIAN_SCHEMES = [
    ("NF4 g64", QuantSpec("nf4", "group", 64, scale_dtype="fp32"), 0.0085),
    ("INT4 asym g64", QuantSpec("uint4", "group", 64, False, scale_dtype="fp32"), 0.0083),
    ("FP4 E2M1 g64", QuantSpec("fp4_e2m1", "group", 64, scale_dtype="fp32"), 0.0112),
    ("MXFP4 (E2M1 b32, E8M0)", QuantSpec("fp4_e2m1", "group", 32, scale_dtype="mx"), 0.0133),
    ("NVFP4 (E2M1 b16, E4M3 + FP32)", QuantSpec("fp4_e2m1", "group", 16, scale_dtype="nv"), None),
    ("MXFP6 E2M3", QuantSpec("fp6_e2m3", "group", 32, scale_dtype="mx"), None),
    ("MXFP6 E3M2", QuantSpec("fp6_e3m2", "group", 32, scale_dtype="mx"), None),
    ("MXFP8 E4M3", QuantSpec("fp8_e4m3", "group", 32, scale_dtype="mx"), None),
    ("MXFP8 E5M2", QuantSpec("fp8_e5m2", "group", 32, scale_dtype="mx"), None),
    ("MXINT8", QuantSpec("int8", "group", 32, scale_dtype="mx"), None),
    ("FP8 E4M3 per channel", QuantSpec("fp8_e4m3", "channel", scale_dtype="fp32"), None),
    ("INT8 per channel", QuantSpec("int8", "channel", scale_dtype="fp32"), None),
]
RATE_DISTORTION_4BIT = 2.0 ** -8      # D(R) = sigma^2 2^(-2R) for a unit Gaussian at R = 4 bits


def gaussian_mse(seed: int = 0, rows: int = 256, cols: int = 4096) -> list[tuple[str, float, float, float | None]]:
    """(label, bits per weight, mean squared error, literature value) of each GAUSSIAN_SCHEMES entry on one
    [rows, cols] N(0, 1) matrix, rows being output channels and blocks running along cols."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    out = []
    for label, spec, known in GAUSSIAN_SCHEMES:
        q = quantize(x, spec)
        out.append((label, q.bits_per_element, float(((q.dequantize() - x) ** 2).mean()), known))
    return out


def render_gaussian_mse() -> str:
    rows = [[label, round(bpw, 3), f"{mse:.5f}", "" if known is None else f"{known:.4f}"]
            for label, bpw, mse, known in gaussian_mse()]
    return "\n".join(["Mean squared error on unit Gaussian weights (256 x 4096, absmax scales, round to nearest)",
                      format_table(["scheme", "bits/weight", "MSE", "literature"], rows),
                      f"4-bit rate-distortion limit (2^-8): {RATE_DISTORTION_4BIT:.4f}"])


def render_formats() -> str:
    rows = []
    for name in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "nf4", "bnb_fp4", "int8", "int4", "ternary"):
        f = get_format(name)
        pos = f.values()[f.values() > 0]
        rows.append([name, f.bits, len(f.values()), f.max_value, float(pos.min())])
    out = ["Number formats (finite values; smallest positive is the smallest subnormal for floats)",
           format_table(["format", "bits", "values", "max", "smallest > 0"], rows), "",
           "FP4 E2M1 values: " + ", ".join(f"{v:g}" for v in get_format("fp4_e2m1").values().tolist()),
           "NF4 levels:      " + ", ".join(f"{v:.4f}" for v in get_format("nf4").values().tolist()), "",
           render_gaussian_mse()]
    return "\n".join(out)


def render_memory(params: float = 70e9) -> str:
    rows = [[r.precision, r.bits_per_weight, r.gb, r.gib] for r in weight_table(params)]
    return f"Weight memory for {params:.3g} parameters\n" + format_table(["precision", "bits/weight", "GB", "GiB"], rows)
