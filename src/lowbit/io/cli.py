"""`lowbit export` and `lowbit import`: translate between the native format and the formats serving
engines load (GGUF, HF GPTQ, AWQ GEMM, bitsandbytes 4-bit, compressed-tensors, AQLM), through the exporter/importer registry."""
from __future__ import annotations

import sys
from pathlib import Path

from lowbit.errors import LowbitError


def _stage(args, message: str) -> None:
    """One line on stderr before a step that may take a while (stdout keeps only the result)."""
    if not args.quiet:
        print(f"lowbit: {message} ...", file=sys.stderr, flush=True)


def _cmd_export(args) -> str:
    from lowbit import api
    from lowbit.io import get_exporter

    from lowbit.io.atomic import check_output

    exporter = get_exporter(args.format)  # unknown format: fail before loading anything
    out = check_output(args.output)
    if args.type and args.format != "gguf":
        raise LowbitError("--type applies to --format gguf only")
    model, tokenizer = api.load_model(args.model, trust_remote_code=args.trust_remote_code)
    options = {"type": args.type} if args.type else {}
    options["progress"] = not args.quiet   # a bar over the tensors written (lowbit.io.progress)
    weights, redone = exporter.prepare(model, args.requantize)
    if args.target:
        _check_target(args.target, args.format, weights, model)
    written = exporter.write(model, weights, out, tokenizer=tokenizer, requantize=args.requantize, **options)
    note = (f"; {len(redone)} quantised weights were rounded again for {args.format} (--requantize): "
            f"{', '.join(redone[:3])}{' ...' if len(redone) > 3 else ''}") if redone else ""
    lines = [f"wrote {args.format} export to {written or out}{note}"]
    if args.verify:
        from lowbit.io.verify import verify

        lines.append(verify(args.format, written or out, model, tokenizer))
    return "\n".join(lines)


def _check_target(target: str, fmt: str, weights: dict, model) -> None:
    from lowbit.io.targets import check_target, shown
    from lowbit.pipeline.arch import shared_input_groups

    family = getattr(model.config, "model_type", None)
    _, problems = check_target(target, weights, shared_input_groups(model), formats=[fmt], family=family)
    if problems:
        raise LowbitError(f"{target} cannot serve this export:\n  " + "\n  ".join(shown(problems)))


def _cmd_import(args) -> str:
    from lowbit import api
    from lowbit.io import get_importer

    from lowbit.io.atomic import check_output

    importer = get_importer(args.format)
    out = check_output(args.output, "output folder")
    if not Path(args.path).exists():
        raise LowbitError(f"not found: {args.path}")
    model, tokenizer = importer(args.path, progress=not args.quiet)   # bars over the tensors read
    _stage(args, f"writing the native folder {out}")
    api.save(model, out, tokenizer=tokenizer)
    return f"imported {args.format} model {args.path} into the native format at {out}"


def register(sub) -> None:
    from lowbit.pipeline.cli import add_threads

    p = sub.add_parser("export", help="write a model in a serving format (gguf, gptq, awq, bnb, compressed-tensors, aqlm)")
    p.add_argument("model", nargs="?", default=None,
                   help="a lowbit-quantised folder (or a HF folder for gguf, which quantises itself); default: bundled model")
    p.add_argument("--format", required=True, help="gguf, gptq, awq, bnb, compressed-tensors or aqlm")
    p.add_argument("--type", help="GGUF file type: Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q3_K_M, Q6_K, Q2_K, F16 ...")
    p.add_argument("--requantize", action="store_true",
                   help="round quantised weights the format cannot hold exactly again (default: refuse them)")
    p.add_argument("--target", choices=["vllm", "llama.cpp", "transformers"],
                   help="check that this engine's kernels can serve the exported weights")
    p.add_argument("--verify", action="store_true",
                   help="load the written files with their consumer (llama.cpp, transformers, vLLM) when installed "
                        "and print its agreement with this model on held-out text")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_threads(p)
    p.add_argument("-o", "--output", required=True, help="file or folder to write (must not exist)")
    p.set_defaults(run=_cmd_export)

    q = sub.add_parser("import", help="read a gguf/gptq/awq/bnb/compressed-tensors/aqlm model into the native format")
    q.add_argument("path", help="the .gguf file or model folder to read")
    q.add_argument("--format", required=True, help="gguf, gptq, awq, bnb, compressed-tensors or aqlm")
    q.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_threads(q)
    q.add_argument("-o", "--output", required=True, help="native folder to write (must not exist)")
    q.set_defaults(run=_cmd_import)
