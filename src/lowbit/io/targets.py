"""What each serving engine can load, as data: the formats it reads and, per format, the limits of its
kernels, each with the source it comes from. `check_target` runs them on the weights a recipe will
produce (placeholders, before any calibration: `lowbit quantize --target`) or holds (`lowbit export
--target`), and returns one line per offending layer.

A model passes for an engine when one of the engine's formats holds every quantised weight exactly and
every weight meets that format's rules for the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lowbit.errors import LowbitError
from lowbit.io import EXPORTERS, load_format_modules
from lowbit.weights import ActQuantWeight, BlockActWeight, QuantizedTensor


@dataclass(frozen=True)
class Rule:
    text: str                                   # what the engine needs, as a refusal states it
    source: str                                 # where the limit is coded or documented
    holds: Callable[[str, object], bool]        # (layer name, weight) -> whether the weight meets it


def _affine(w):
    if isinstance(w, BlockActWeight):       # activations in the weight's own block format: the weight decides
        return w.weight
    return w.weight if isinstance(w, ActQuantWeight) else w if isinstance(w, QuantizedTensor) else None


def _bits_in(allowed):
    return lambda name, w: _affine(w) is None or not _affine(w).spec.number_format.is_integer \
        or isinstance(w, ActQuantWeight) or _affine(w).spec.bits in allowed


def _block_float(q) -> bool:
    """An NVFP4 / MX float weight: its block is part of its format, with kernels of its own."""
    return q is not None and q.spec.scale_dtype in ("mx", "nv") and not q.spec.number_format.is_integer


def _groups_in(allowed):
    def holds(name, w):
        q = _affine(w)
        if q is None or isinstance(w, ActQuantWeight) or _block_float(q):
            return True
        return (q.spec.group_size or -1) in allowed
    return holds


def _shape_multiple(out_multiple: int, in_multiple: int):
    def holds(name, w):
        q = _affine(w)
        if q is None or isinstance(w, ActQuantWeight) or not q.spec.number_format.is_integer:
            return True
        rows, cols = q.shape
        return rows % out_multiple == 0 and cols % in_multiple == 0
    return holds


def _symmetric(name, w):
    q = _affine(w)
    return q is None or q.spec.symmetric


def _vllm_block_float(name, w):
    q = _affine(w)
    return not _block_float(q) or (q.spec.format, q.spec.scale_dtype) in (
        ("fp4_e2m1", "nv"), ("fp4_e2m1", "mx"), ("fp8_e4m3", "mx"))


_MARLIN = "vllm/model_executor/layers/quantization/utils/marlin_utils.py"
_WNA16 = "vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py"
VLLM_WNA16 = (
    Rule("weight-only int grids of 4 or 8 bits (WNA16_SUPPORTED_BITS)", _WNA16, _bits_in({4, 8})),
    Rule("group size -1 (per channel), 32, 64 or 128 (MARLIN_SUPPORTED_GROUP_SIZES)", _MARLIN,
         _groups_in({-1, 32, 64, 128})),
    Rule("out_features a multiple of 64 and in_features of 128 (GPTQ_MARLIN_MIN_THREAD_N/K)", _MARLIN,
         _shape_multiple(64, 128)),
)
# Which formats each engine reads, and the rules of each (in the engine's order of preference).
ENGINES: dict[str, dict[str, tuple[Rule, ...]]] = {
    "vllm": {
        "compressed-tensors": VLLM_WNA16 + (Rule(
            "block float weights NVFP4, MXFP4 or MXFP8, weight-only or with activations in the same block "
            "format (CompressedTensorsW4A4Fp4 / W4A16Fp4, W4A4Mxfp4, W8A8Mxfp8; no scheme reads MXFP6; GPU kernels)",
            "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py "
            "(_get_scheme_from_parts)", _vllm_block_float),),
        "gptq": VLLM_WNA16 + (Rule("symmetric grids (GPTQ Marlin has no zero points)", _MARLIN, _symmetric),),
        "awq": VLLM_WNA16,
    },
    "llama.cpp": {"gguf": (Rule(
        "ggml blocks or symmetric g32 grids (an asymmetric uint4/uint5 g32 weight is Q4_1/Q5_1 only where "
        "every d*z happens to be an fp16 value; use ggml-q4_1 to get that type)",
        "lowbit/weights/ggml/affine.py", _symmetric),)},
    "transformers": {
        "compressed-tensors": (Rule(
            "symmetric grids (transformers 5.24 with compressed-tensors 0.20 builds asymmetric zero points "
            "unpacked and refuses the packed ones it writes; tests/io/test_compressed_tensors.py)",
            "transformers/quantizers/quantizer_compressed_tensors.py", _symmetric),),
        "bnb": (),
        # the aqlm package decodes any (M, B) on CPU (numba for 2^8 entries, else dequantise + matmul) and on
        # GPU (CUDA kernels for 1x16, 2x8, 1x8; Triton otherwise): aqlm/inference_kernels/kernel_selector.py
        "aqlm": (),
    },
}
# Model families lowbit can write for an engine, where that is narrower than the engine's own list.
FAMILIES = {"llama.cpp": (("llama",), "lowbit's GGUF writer (io/gguf.py) maps Llama-architecture tensors only")}
SHOWN = 20    # problem lines shown; the rest are counted

# Linears an engine fuses into one layer must share one scheme: vLLM's QKVParallelLinear and
# MergedColumnParallelLinear take one quantisation method per fused layer.
FUSES_GROUPS = {"vllm": "vllm/model_executor/layers/linear.py (QKVParallelLinear, MergedColumnParallelLinear)"}


def _format_problems(fmt: str, rules, weights: dict) -> list[str]:
    exporter, problems = EXPORTERS[fmt], []
    for name, w in weights.items():
        problem = exporter.problem(w)
        if problem:
            problems.append(f"{name}: {problem}")
            continue
        problems += [f"{name}: {fmt} needs {r.text} [{r.source}]" for r in rules if not r.holds(name, w)]
    return problems


def _fusion_problems(engine: str, weights: dict, fused_groups: list[list[str]]) -> list[str]:
    if engine not in FUSES_GROUPS:
        return []
    out = []
    for group in fused_groups:
        held = [weights.get(n) for n in group]
        kinds = {None if w is None else (type(w).__name__, repr(getattr(_affine(w), "spec", None))) for w in held}
        if len(kinds) > 1:
            out.append(f"{', '.join(group)}: {engine} fuses these into one layer, so they need one scheme "
                       f"[{FUSES_GROUPS[engine]}]")
    return out


def _family_problems(engine: str, family: str | None) -> list[str]:
    if engine not in FAMILIES or family is None or family in FAMILIES[engine][0]:
        return []
    return [f"the {family!r} architecture: {FAMILIES[engine][1]}"]


def shown(problems: list[str]) -> list[str]:
    """At most SHOWN lines, the rest counted."""
    extra = len(problems) - SHOWN
    return problems[:SHOWN] + ([f"... and {extra} more"] if extra > 0 else [])


def check_target(engine: str, weights: dict, fused_groups=(), formats=None,
                 family: str | None = None) -> tuple[str | None, list[str]]:
    """(the engine format that holds every weight, []) or (None, one line per problem with the engine's
    preferred format). `weights`: {Linear name: weight or placeholder}; fused_groups: Linears sharing an
    input (the Arch's groups), which fusing engines run as one layer; formats: only these formats;
    family: the model's architecture (config.model_type)."""
    if engine not in ENGINES:
        raise LowbitError(f"unknown target {engine!r}; known: {', '.join(ENGINES)}")
    load_format_modules()
    candidates = {f: r for f, r in ENGINES[engine].items() if formats is None or f in formats}
    if not candidates:
        raise LowbitError(f"{engine} reads none of {', '.join(formats)}; it reads {', '.join(ENGINES[engine])}")
    fusion = _fusion_problems(engine, weights, fused_groups) + _family_problems(engine, family)
    first = None
    for fmt, rules in candidates.items():
        problems = _format_problems(fmt, rules, weights) + fusion
        if not problems:
            return fmt, []
        first = first or (fmt, problems)
    return None, [f"{engine} ({first[0]}): {p}" for p in first[1]]
