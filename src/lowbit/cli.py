"""The `lowbit` command. Every subcommand is a thin layer over the Python API."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import signal
import sys

from lowbit.errors import LowbitError


def _cmd_calc_memory(args) -> str:
    from lowbit.calc import as_dict, weight_memory, weight_table

    if args.bits is None and args.group_size is not None:
        raise LowbitError("--group-size needs --bits (the table without --bits lists fixed precisions)")
    if args.bits is not None:
        rows = [weight_memory(args.params, args.bits, args.group_size, args.scale_bits, args.zero_bits,
                              label=f"{args.bits:g}-bit" + (f"-g{args.group_size}" if args.group_size else ""))]
    else:
        rows = weight_table(args.params)
    if args.json:
        return json.dumps([as_dict(r) for r in rows], indent=2)
    from lowbit.table import format_table

    return f"Weight memory for {args.params:.4g} parameters\n" + format_table(
        ["precision", "bits/weight", "GB", "GiB"], [[r.precision, r.bits_per_weight, r.gb, r.gib] for r in rows])


def _cmd_calc_kv(args) -> str:
    from lowbit.calc import as_dict, kv_cache_memory, quantized_kv_cache_memory

    dims = (args.layers, args.kv_heads, args.head_dim, args.seq_len, args.batch)
    if args.scheme:
        size = quantized_kv_cache_memory(*dims, args.scheme, args.dtype)
        if args.json:
            return json.dumps(as_dict(size), indent=2)
        return (f"KV cache, lowbit's {size.dtype} cache (newest tokens at {args.dtype}): {size.bits_per_element:.4g} bits "
                f"per element on average\n= {size.bytes:,.0f} bytes = {size.gb:,.2f} GB = {size.gib:,.2f} GiB")
    size = kv_cache_memory(*dims, args.dtype)
    if args.json:
        return json.dumps(as_dict(size), indent=2)
    return (f"KV cache: 2 x {args.layers} layers x {args.kv_heads} KV heads x {args.head_dim} head dim x "
            f"{args.seq_len} tokens x batch {args.batch} x {size.bits_per_element / 8:g} bytes ({args.dtype})\n"
            f"= {size.bytes:,.0f} bytes = {size.gb:,.2f} GB = {size.gib:,.2f} GiB")


def _cmd_demo(args) -> str:
    from lowbit import demos

    parts = {"basics": demos.render_basics, "formats": demos.render_formats, "memory": demos.render_memory}
    if args.which == "outliers":  # quantises the bundled model ten times: minutes, so not part of "all"
        from lowbit.eval.outliers import render_demo

        return render_demo()
    chosen = [args.which] if args.which != "all" else list(parts)
    return "\n\n".join(parts[name]() for name in chosen)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number: {text!r}")
    return v


class Parser(argparse.ArgumentParser):
    """argparse with errors in one line (its usage block is what --help is for)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lowbit", description="Quantise large language models.")
    from lowbit._version import __version__

    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    calc = sub.add_parser("calc", help="memory calculators").add_subparsers(dest="calc", required=True)
    mem = calc.add_parser("memory", help="weight memory at each precision")
    mem.add_argument("--params", type=_positive_float, required=True, help="parameter count, e.g. 70e9")
    mem.add_argument("--bits", type=float, help="one precision only: bits per weight")
    mem.add_argument("--group-size", type=int, help="with --bits: elements per scale group")
    mem.add_argument("--scale-bits", type=int, default=16, help="bits per group scale (default 16)")
    mem.add_argument("--zero-bits", type=int, default=0, help="bits per group zero point (default 0)")
    mem.add_argument("--json", action="store_true", help="machine-readable output")
    mem.set_defaults(run=_cmd_calc_memory)

    kv = calc.add_parser("kv-cache", help="KV-cache memory")
    kv.add_argument("--layers", type=int, required=True, help="decoder layers")
    kv.add_argument("--kv-heads", type=int, required=True, help="key/value heads (fewer than query heads under GQA)")
    kv.add_argument("--head-dim", type=int, required=True, help="dimension of one attention head")
    kv.add_argument("--seq-len", type=int, required=True, help="tokens held in the cache")
    kv.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    kv.add_argument("--dtype", default="fp16", help="fp32, fp16, bf16, fp8, int8, int4, ...")
    kv.add_argument("--scheme", help="lowbit's quantised cache: int8, int4, int2, fp8 with -g<group> -r<window> "
                                     "(scales, zero points and the full-precision window counted)")
    kv.add_argument("--json", action="store_true", help="machine-readable output")
    kv.set_defaults(run=_cmd_calc_kv)

    demo = sub.add_parser("demo", help="worked exercises and tables")
    demo.add_argument("which", nargs="?", default="all", choices=["all", "basics", "formats", "memory", "outliers"],
                      help="which part (default all; outliers takes minutes)")
    demo.set_defaults(run=_cmd_demo)

    for mod in COMMAND_MODULES:
        module = _optional_module(mod)
        if module is not None:
            module.register(sub)
    return p


# Packages that add subcommands: each module has register(subparsers) and sets `run` on its parsers.
COMMAND_MODULES = ("lowbit.pipeline.cli", "lowbit.eval.cli", "lowbit.io.cli", "lowbit.train.cli", "lowbit.train.fp8_cli",
                   "lowbit.train.bitnet_cli", "lowbit.advisor_cli")


def _optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if not name.startswith(e.name or "\0"):  # only the module (or its package) itself may be absent
            raise
        return None


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so every temporary output is removed on the way out


def _quiet_libraries() -> None:
    """Import-time chatter of optional libraries (torchao's missing kernels, torch's pytree notices) is
    not the user's business: errors stay one line."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:
        from lowbit.pipeline.checkpoint import environment_threads

        try:
            environment_threads(args.threads)
        except LowbitError as e:
            print(f"lowbit: error: {e}", file=sys.stderr)
            return 2
    previous = _install(signal.SIGTERM, _terminate)
    try:
        out = args.run(args)
    except (LowbitError, OSError) as e:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        print(f"lowbit: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(getattr(e, "hint", None) or "lowbit: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        _install(signal.SIGTERM, previous)
    if out:
        try:
            print(out)
            sys.stdout.flush()
        except BrokenPipeError:  # `lowbit ... | head`: the reader left, which is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _install(signum, handler):
    try:
        return signal.signal(signum, handler)
    except (ValueError, OSError, TypeError):  # not the main thread
        return None


MAX_MESSAGE = 1000    # characters of an error shown: a message may quote a hostile file's contents


def _one_line(e: BaseException) -> str:
    from lowbit.io.atomic import no_space

    if isinstance(e, OSError) and not isinstance(e, LowbitError):
        if no_space(e):
            return f"no space left on device writing {e.filename or 'the output'}"
        return _shortened(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
    return _shortened(str(e))


def _shortened(text: str) -> str:
    if len(text) <= MAX_MESSAGE:
        return text
    half = MAX_MESSAGE // 2
    return f"{text[:half]} ... ({len(text) - 2 * half:,} characters left out) ... {text[-half:]}"


if __name__ == "__main__":
    sys.exit(main())
