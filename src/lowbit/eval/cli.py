"""`lowbit eval` and `lowbit compare`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.errors import LowbitError

DEFAULT_OUT = "out/compare"


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {n}")
    return n


def _read_text(path) -> str | None:
    if path is None:
        return None
    from lowbit.pipeline.calibration import read_utf8

    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"eval text not found: {p}")
    return read_utf8(p)


def _cmd_eval(args) -> str:
    from lowbit import api
    from lowbit.eval.evaluate import eval_windows, evaluate
    from lowbit.eval.fidelity import build_reference

    text = _read_text(args.text)
    model, tokenizer = api.load_model(args.model, trust_remote_code=args.trust_remote_code)
    reference = None
    if args.reference:
        ref_model, ref_tokenizer = api.load_model(args.reference)
        windows = eval_windows(ref_model, ref_tokenizer or tokenizer, text, context=args.context,
                               max_eval_tokens=args.max_eval_tokens)
        reference = build_reference(ref_model, windows, progress=not args.quiet)
        del ref_model
    row = evaluate(model, tokenizer, text, reference, context=args.context,
                   max_eval_tokens=args.max_eval_tokens, speed=not args.no_speed, progress=not args.quiet)
    row = {"model": str(args.model or "bundled"), **row}
    return json.dumps(row, indent=2) if args.json else render_eval(row)


def render_eval(row: dict) -> str:
    lines = [f"model: {row['model']}", f"perplexity: {row['perplexity']:.4f}  ({row['protocol']})"]
    if "kl" in row:
        lines.append(f"KL: {row['kl']:.5g} nats, top-1 agreement {100 * row['top1']:.2f}%, delta-PPL "
                     f"{row['delta_ppl']:+.4f}  ({row['fidelity_protocol']})")
    lines.append(f"memory: {row['memory_bytes']:,} bytes, {row['bits_per_weight']:.4g} bits/weight, "
                 f"{row['quantized_linears']} quantised Linears  ({row['memory_protocol']}; held now "
                 f"{row['memory_held_bytes']:,} bytes)")
    if row.get("quantized_linear_ratio") is not None:
        lines.append(f"quantised Linears: {row['quantized_linear_bytes']:,} bytes = "
                     f"{row['quantized_linear_ratio']:.4f} x their fp16 size")
    if row.get("prefill_tokens_per_s") is not None:
        lines.append(f"speed: prefill {row['prefill_tokens_per_s']:.1f} tokens/s, decode "
                     f"{row['decode_tokens_per_s']:.1f} tokens/s  ({row['speed_protocol']})")
    return "\n".join(lines)


def _cmd_compare(args) -> str:
    from lowbit.eval.compare import compare, parse_methods
    from lowbit.eval.report import render_json, render_text, write_report

    from lowbit.eval.report import check_report_out

    parse_methods(args.methods)  # a bad name is reported before the model is loaded
    if args.out:
        check_report_out(args.out)  # never overwritten, and refused before minutes of work
    rows = compare(args.methods, args.model, args.calibration, text=_read_text(args.text), context=args.context,
                   max_eval_tokens=args.max_eval_tokens, n_samples=args.samples, seq_len=args.seq_len,
                   seed=args.seed, speed=not args.no_speed, calibration_mode=args.calibration_mode,
                   trust_remote_code=args.trust_remote_code)
    written = write_report(rows, args.out) if args.out else []
    if args.json:
        return render_json(rows)
    files = f"\n\nwrote {', '.join(str(p) for p in written)}" if written else ""
    if args.out and not any(p.suffix == ".png" for p in written):
        files += " (no compare.png: matplotlib is not installed; pip install matplotlib)"
    return render_text(rows) + files


def _cmd_kv_cache(args) -> str:
    from lowbit import api
    from lowbit.eval.evaluate import eval_windows
    from lowbit.eval.kv import kv_report, parse_kv_schemes, render_kv_report

    schemes = parse_kv_schemes(args.schemes)
    try:
        tokens = tuple(_positive_int(t) for t in args.memory_tokens.split(","))
    except argparse.ArgumentTypeError as e:
        raise LowbitError(f"--memory-tokens: {e}") from None
    model, tokenizer = api.load_model(args.model, trust_remote_code=args.trust_remote_code)
    windows = eval_windows(model, tokenizer, _read_text(args.text), context=args.context,
                           max_eval_tokens=args.max_eval_tokens)
    rows = kv_report(model, windows.ids.reshape(-1), schemes, windows.context, tokens, step=args.step,
                     speed=not args.no_speed)
    return json.dumps(rows, indent=2) if args.json else render_kv_report(rows, tokens)


def _add_eval_options(p, model_help: str) -> None:
    from lowbit.pipeline.cli import add_threads

    p.add_argument("model", nargs="?", default=None, help=f"{model_help}; omitted: the bundled model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--text", help="held-out UTF-8 text file (default: the bundled eval text)")
    p.add_argument("--max-eval-tokens", type=_positive_int, default=16384, help="tokens of eval text (default 16384)")
    p.add_argument("--context", type=_positive_int,
                   help="window length in tokens (default: the model's context, at most 256)")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode speed measurement")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    add_threads(p)


def register(sub) -> None:
    from lowbit.eval.compare import DEFAULT_METHODS
    from lowbit.pipeline.cli import add_calibration_mode

    ev = sub.add_parser("eval", help="perplexity, fidelity, memory and speed of one model")
    _add_eval_options(ev, "Hugging Face or lowbit-quantised model folder")
    ev.add_argument("--reference", help="full-precision model folder to measure KL / top-1 / delta-PPL against")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(run=_cmd_eval)

    kv = sub.add_parser("kv-cache", help="perplexity, memory and decode speed with a quantised KV cache")
    _add_eval_options(kv, "Hugging Face or lowbit-quantised model folder")
    kv.add_argument("--schemes", default="fp16,int8,int4,fp8",
                    help="comma-separated KV-cache schemes: fp16 (the model's own cache), int8, int4, int2, fp8, "
                         "with -g<group> and -r<residual window>, e.g. int4-g32-r128 (default fp16,int8,int4,fp8)")
    kv.add_argument("--memory-tokens", default="4096,32768", help="token counts the live cache is measured at")
    kv.add_argument("--step", type=_positive_int, default=1,
                    help="tokens fed per forward pass when scoring (default 1: token by token, as decoding)")
    kv.set_defaults(run=_cmd_kv_cache)

    cmp = sub.add_parser("compare", help="quantise with several methods and compare them in one table")
    _add_eval_options(cmp, "Hugging Face model folder to quantise")
    cmp.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                     help="comma-separated short names: fp16, fp32, rtn-int8, rtn-int4-g128, gptq-int4-g128, "
                          f"nf4, q4_k_m, ... (default {','.join(DEFAULT_METHODS)})")
    cmp.add_argument("--out", default=DEFAULT_OUT,
                     help=f"folder for compare.md, compare.json and compare.png (default {DEFAULT_OUT}; '' for none)")
    cmp.add_argument("--calibration", help=".txt, .jsonl, .parquet or saved dataset folder (default: bundled text)")
    add_calibration_mode(cmp)
    cmp.add_argument("--samples", type=_positive_int, help="calibration windows or samples (default: lowbit.api's, 128)")
    cmp.add_argument("--seq-len", type=_positive_int, help="tokens per calibration window (default min(context, 256))")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    cmp.set_defaults(run=_cmd_compare)
