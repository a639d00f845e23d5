"""`lowbit advise`: which method and scheme to use for a model, a memory budget and a target engine.

From the model's shape alone (a config.json, or a class such as "7b"), lowbit's calculators give the size
of every candidate exactly (lowbit.calc.model_size: the weights each method plans, the same count `lowbit
eval` reports) plus the KV cache at the context and batch asked for, plus what the engine needs beside them
(runtime_reserve: llama.cpp's compute buffers, transformers' prefill activations, from the shape). Then:

  quality "max"       the highest-precision candidate that fits;
  quality "balanced"  the target's usual choice (the seeds' table: llama.cpp -> Q4_K_M, vLLM -> GPTQ/AWQ int4,
                      transformers -> NF4, fine-tuning -> NF4 + QLoRA), or a more precise option when that
                      still leaves 40% of the memory free; the best smaller one when the usual does not fit.
When the pick is the most precise uniform option that fits and leaves real headroom, the advisor also
offers to spend it: a budgeted mix (`lowbit quantize --budget`, one scheme per Linear chosen by measured
sensitivity) sized to the memory left, where the target can load one (spend_headroom).
With --measure (advisor_cli.measure), the candidates that fit and the budgeted mix are quantised and
evaluated on the user's model (`lowbit compare`'s protocol) and the pick comes from measured KL to the
unquantised model: the mix may become the pick, or stay beside a smaller pick it is more faithful than.
A model that fits under no candidate is said to, with what it would need.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.advisor_mix import MIX_PLANS, Mix, evidence_text, mix_command, spend_headroom
from lowbit.calc import (GB, PRESET_SHAPES, ModelShape, kv_cache_memory, llamacpp_compute_buffer, model_size,
                         parse_size, quantized_kv_cache_memory, transformers_prefill_activations)
from lowbit.errors import LowbitError

# The least runtime reserve: what no formula here counts (a GPU's CUDA context and library workspaces, the
# engine's own process). A round figure, the reserve this advisor used for everything before.
RESERVE_FLOOR = 0.5 * GB
VLLM_UTILISATION = 0.9          # vLLM's default gpu_memory_utilization: it never plans for the last 10%
BALANCED_SHARE = 0.6            # balanced goes above the usual choice only when that leaves 40% free
LORA_RANK = 16
LORA_BYTES_PER_PARAM = 16       # fp32 weight, gradient and two Adam moments


@dataclass(frozen=True)
class Candidate:
    method: str | None          # lowbit short name; None = the fp16 model as it is
    label: str
    quality: str
    usual: bool = False         # the target's usual ("balanced") choice


def _quality(bits: float) -> str:
    if bits >= 16:
        return "lossless"
    if bits >= 5.5:
        return "near-lossless"
    if bits >= 4:
        return "small loss"
    if bits >= 3:
        return "noticeable loss"
    return "large loss"


TARGETS: dict[str, list[tuple[str | None, str, bool]]] = {
    "llama.cpp": [(None, "F16 GGUF", False), ("q8_0", "Q8_0 GGUF", False), ("q6_k", "Q6_K GGUF", False),
                  ("q5_k_m", "Q5_K_M GGUF", False), ("q4_k_m", "Q4_K_M GGUF", True),
                  ("q3_k_m", "Q3_K_M GGUF", False), ("q2_k", "Q2_K GGUF", False)],
    "vllm": [(None, "fp16", False), ("rtn-fp8_e4m3-a8dyn", "FP8 W8A8 (compressed-tensors)", False),
             ("gptq-int4-g128", "GPTQ int4 g128 (or AWQ, same size)", True)],
    "transformers": [(None, "fp16", False), ("llm-int8", "LLM.int8() (bitsandbytes)", False),
                     ("nf4", "NF4 (bitsandbytes)", True), ("gptq-int4-g128", "GPTQ int4 g128", False),
                     ("hqq-int3-g64", "HQQ int3 g64", False),
                     ("quip", "QuIP# 2-bit (E8P lattice codebook)", False)],
    "finetune": [(None, "LoRA on the fp16 model", False), ("nf4", "QLoRA: NF4 base + LoRA", True)],
}
COMMANDS = {
    "llama.cpp": "lowbit quantize {model} --method {method} --out OUT && lowbit export OUT --format gguf --out OUT.gguf",
    "vllm": "lowbit quantize {model} --method {method} --out OUT --target vllm && lowbit export OUT --format "
            "compressed-tensors --out OUT-ct --verify",
    "transformers": "lowbit quantize {model} --method {method} --out OUT",
    "finetune": "lowbit finetune {model} --quant {method} -o OUT",
}


@dataclass
class Option:
    label: str
    method: str | None
    quality: str
    bits_per_weight: float
    weight_bytes: float
    other_bytes: float          # KV cache (inference) or adapters, optimizer and activations (fine-tuning)
    total_bytes: float
    fits: bool
    linear_bits: float = 0.0    # bits per weight of the quantised Linears alone (16 at fp16)
    perplexity: float | None = None
    kl: float | None = None     # measured: mean KL(fp || quantised) of next-token distributions, nats per token
    command: str | None = None  # the commands that make it, where not the target's usual one (a budgeted mix)


@dataclass
class Advice:
    model: str
    params: int
    memory_bytes: float
    target: str
    quality: str
    context: int
    batch: int
    kv_cache: str
    pick: Option | None
    options: list[Option]
    reserve_bytes: float = RESERVE_FLOOR
    reasons: list[str] = field(default_factory=list)
    command: str | None = None
    mix: Option | None = None           # the budgeted mix that spends the headroom, when there is one
    mix_command: str | None = None
    mix_reason: str = ""                # why the mix, or why none


def resolve_shape(model: str) -> ModelShape:
    """A class name ("7b", "13b", "70b", ...) or a model folder with a config.json (nothing else read)."""
    if str(model).lower() in PRESET_SHAPES:
        return PRESET_SHAPES[str(model).lower()]
    path = Path(model)
    if not (path / "config.json").is_file():
        raise LowbitError(f"{model!r} is neither a model folder with a config.json nor one of "
                          f"{', '.join(PRESET_SHAPES)}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    return ModelShape.from_config(config, path.name)


def parse_bytes(text) -> float:
    """"8GB", "24 GiB", "512MB", "8" (GB) -> bytes."""
    value = parse_size(text, GB)
    if value is None:
        raise LowbitError(f"cannot read a memory size from {text!r}: use e.g. 8GB or 24GiB")
    if not 0 < value < float("inf"):
        raise LowbitError(f"memory must be a positive size, got {text!r}")
    return value


def _inference_extra(shape: ModelShape, context: int, batch: int, kv_cache: str | None = None) -> float:
    """The KV cache at `context` x `batch`: fp16, or lowbit's quantised cache (`kv_cache` such as "int8")."""
    args = (shape.layers, shape.kv_heads, shape.head_dim, context, batch)
    if kv_cache in (None, "fp16"):
        return kv_cache_memory(*args, "fp16").bytes
    return quantized_kv_cache_memory(*args, kv_cache).bytes


def _finetune_extra(shape: ModelShape, context: int, batch: int, kv_cache=None) -> float:
    """LoRA (rank 16 on every Linear) with fp32 weights, gradients and Adam moments, plus activations under
    gradient checkpointing: one bf16 hidden state per layer and one layer recomputed, and fp32 logits."""
    lora = LORA_RANK * sum(o + i for *_, (o, i) in shape.linears())
    tokens = context * batch
    checkpoints = 2 * tokens * shape.hidden * shape.layers
    one_layer = 2 * tokens * (8 * shape.hidden + 3 * shape.intermediate)
    logits = 2 * 4 * tokens * shape.vocab        # logits and their gradient in fp32
    return lora * LORA_BYTES_PER_PARAM + checkpoints + one_layer + logits


def runtime_reserve(shape: ModelShape, target: str, context: int, batch: int) -> float:
    """Bytes the engine needs beside weights and KV cache, never less than RESERVE_FLOOR: llama.cpp its
    compute and output buffers (calc.llamacpp_compute_buffer), transformers the prompt's prefill
    activations (calc.transformers_prefill_activations), both at context x batch tokens. vLLM measures its
    own activation peak in a profiling run and takes it from the KV-cache share, and fine-tuning counts its
    activations in its own extra: those two get the floor."""
    if target == "llama.cpp":
        estimate = llamacpp_compute_buffer(shape, context * batch, batch)
    elif target == "transformers":
        estimate = transformers_prefill_activations(shape, context * batch)
    else:
        estimate = 0
    return max(RESERVE_FLOOR, float(estimate))


def usable_memory(memory: float, target: str, reserve: float = RESERVE_FLOOR) -> float:
    """What weights and KV cache may take: vLLM plans for 90% of the memory; the reserve comes off."""
    return memory * (VLLM_UTILISATION if target == "vllm" else 1.0) - reserve


def options(shape: ModelShape, memory: float, target: str, context: int, batch: int,
            kv_cache: str | None = None) -> list[Option]:
    """Every candidate of `target`, highest precision first, with its exact size and whether it fits."""
    if target not in TARGETS:
        raise LowbitError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    usable = usable_memory(memory, target, runtime_reserve(shape, target, context, batch))
    extra = (_finetune_extra if target == "finetune" else _inference_extra)(shape, context, batch, kv_cache)
    out = []
    for method, label, _ in TARGETS[target]:
        try:
            size = model_size(shape, method)
        except LowbitError:      # a scheme this shape cannot take (a group wider than a row): not an option
            continue
        total = size.bytes + extra
        linear_bits = 8 * size.linear_bytes / shape.linear_params   # quality follows the quantised matrices
        out.append(Option(label, method, _quality(linear_bits), size.bits_per_weight, size.bytes,
                          extra, total, total <= usable, linear_bits))
    return out


def choose(opts: list[Option], target: str, quality: str, usable: float) -> Option | None:
    """max: the most precise option that fits. balanced: the most precise option no less precise than the
    target's usual one that takes at most BALANCED_SHARE of the usable memory (room left for a longer
    context or a larger batch, and fewer bytes to read per token); else the usual one, or the best smaller
    option that fits."""
    if quality not in ("max", "balanced"):
        raise LowbitError(f"quality is max or balanced, not {quality!r}")
    fitting = [o for o in opts if o.fits]
    if not fitting:
        return None
    if quality == "max":
        return fitting[0]
    usual = next(method for method, _, u in TARGETS[target] if u)
    start = next((i for i, o in enumerate(opts) if o.method == usual), len(opts) - 1)
    roomy = [o for o in opts[:start] if o.total_bytes <= BALANCED_SHARE * usable]
    return roomy[0] if roomy else next((o for o in opts[start:] if o.fits), fitting[0])


def advise(model: str, memory, target: str = "llama.cpp", quality: str = "balanced", context: int | None = None,
           batch: int = 1, kv_cache: str | None = None) -> Advice:
    """The recommendation for `model` under `memory` (bytes or text such as "8GB") on `target`."""
    shape = resolve_shape(model)
    memory = parse_bytes(memory) if isinstance(memory, str) else float(memory)
    if context is None:
        context = 2048 if target == "finetune" else 4096
    for name, v in (("context", context), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise LowbitError(f"{name} must be a positive integer, got {v!r}")
    if kv_cache not in (None, "fp16") and target != "transformers":
        raise LowbitError(f"--kv-cache plans for lowbit's quantised KV cache, which runs in transformers; "
                          f"{target} keeps its own cache (plan with the default fp16)")
    opts = options(shape, memory, target, context, batch, kv_cache)
    reserve = runtime_reserve(shape, target, context, batch)
    pick = choose(opts, target, quality, usable_memory(memory, target, reserve))
    advice = Advice(str(model), shape.params, memory, target, quality, context, batch, kv_cache or "fp16", pick, opts,
                    reserve)
    return conclude(advice, shape)


def conclude(a: Advice, shape: ModelShape) -> Advice:
    """Fill in what follows from the pick: the mix that spends its headroom, the reasons, the commands."""
    headroom_mix(a, shape)
    a.reasons = explain(a, shape)
    a.command = command(a)
    return a


def headroom_mix(a: Advice, shape: ModelShape, samples: int | None = None) -> None:
    """Set a.mix, a.mix_command and a.mix_reason: the budgeted mix that spends the headroom above a.pick,
    or None and why not. samples: the calibration windows its command passes (`--samples`), given by
    advise --measure so that the command makes the mix it measured; None leaves quantize's defaults."""
    room = usable_memory(a.memory_bytes, a.target, a.reserve_bytes) - (a.pick.other_bytes if a.pick else 0)
    mix, a.mix_reason = spend_headroom(shape, a.options, a.pick, a.target, room)
    a.mix = None if mix is None else _mix_option(mix, a.pick, room,
                                                 mix_command(mix, _model_arg(a), a.target, samples))
    a.mix_command = None if mix is None else a.mix.command


def _mix_option(mix: Mix, pick: Option, room: float, cmd: str) -> Option:
    """The mix as an option beside the pick: its size is an upper bound (the knapsack stays within it)."""
    size = mix.size
    return Option(f"budgeted mix at {mix.bits:.2f} bits per weight over the Linears ({mix.plan.family})",
                  f"{mix.plan.method} --budget {mix.bits:.2f}bpw", _quality(mix.bits), size.bits_per_weight,
                  size.bytes, pick.other_bytes, size.bytes + pick.other_bytes, size.bytes <= room, mix.bits, command=cmd)


def command(a: Advice) -> str | None:
    """The commands that carry out the pick (MODEL stands for a class name: there are no weights to quantise)."""
    if a.pick is None or a.pick.method is None:
        return None
    if a.pick.command:
        return a.pick.command
    return COMMANDS[a.target].format(model=_model_arg(a), method=a.pick.method)


def _model_arg(a: Advice) -> str:
    return "MODEL" if a.model.lower() in PRESET_SHAPES else a.model


WHY_TARGET = {
    "llama.cpp": "llama.cpp runs GGUF files on CPUs (and GPUs); its k-quant mixes give sensitive tensors more bits",
    "vllm": "vLLM serves GPTQ/AWQ int4 and FP8 checkpoints with fused kernels; it plans for 90% of GPU memory",
    "transformers": "transformers loads bitsandbytes, GPTQ and HQQ weights directly; NF4 needs no calibration",
    "finetune": "fine-tuning a quantised base: QLoRA trains LoRA adapters over a frozen NF4 model",
}
RESERVE_WHAT = {
    "llama.cpp": "llama.cpp's compute buffers at this context",
    "transformers": "the prompt's prefill activations",
    "vllm": "the runtime (vLLM takes its activations from the KV-cache share)",
    "finetune": "the runtime",
}


# --measure picks by KL(p_fp || p_q) per token: a few thousand tokens of perplexity are too noisy to order
# near-lossless options. On text like the model's own, KL approximates the log-perplexity increase, so balanced's
# bound stands for a perplexity rise of about 2%.
BALANCED_KL = math.log(1.02)
MEASURED_RULE = {"max": "the lowest KL (perplexity on a few thousand tokens is too noisy to order near-lossless "
                        "options)",
                 "balanced": f"the smallest option whose KL is at most {BALANCED_KL:.4f} nats per token (about a "
                             f"2% perplexity rise), else the lowest KL"}


def gb_text(x: float) -> str:
    return f"{x / GB:.2f} GB"


def explain(a: Advice, shape: ModelShape) -> list[str]:
    """Why the pick, in sentences: the target, what it costs, what was given up, and when nothing fits."""
    extra = f"KV cache ({a.kv_cache})" if a.target != "finetune" else "adapters, optimizer and activations"
    out = [f"{shape.name}: {a.params / 1e9:.2f}B parameters ({shape.layers} layers, hidden {shape.hidden}, "
           f"{shape.kv_heads} KV heads); {WHY_TARGET[a.target]}."]
    if a.pick is None:
        smallest = min(a.options, key=lambda o: o.total_bytes)
        out.append(f"It will not fit: the smallest option, {smallest.label}, needs {gb_text(smallest.total_bytes)} "
                   f"({gb_text(smallest.weight_bytes)} weights + {gb_text(smallest.other_bytes)} {extra}) plus "
                   f"{gb_text(a.reserve_bytes)} for {RESERVE_WHAT[a.target]}, against {gb_text(a.memory_bytes)}. A larger budget, a shorter context, offloading layers "
                   f"to CPU memory, or a smaller model would.")
        return out
    p = a.pick
    floor = " (the floor)" if a.reserve_bytes == RESERVE_FLOOR else ""
    out.append(f"{p.label}: {p.bits_per_weight:.2f} bits per weight over the whole model ({p.quality}), "
               f"{gb_text(p.weight_bytes)} of weights + {gb_text(p.other_bytes)} {extra} at {a.context} tokens x batch {a.batch} = {gb_text(p.total_bytes)} "
               f"of {gb_text(a.memory_bytes)}, with {gb_text(a.reserve_bytes)} more kept for {RESERVE_WHAT[a.target]}"
               f"{floor}.")
    better = [o for o in a.options[: a.options.index(p)] if o.fits]
    if a.quality == "balanced" and better and p.kl is None:
        out.append(f"{better[0].label} would also fit ({gb_text(better[0].total_bytes)}); it is the pick for "
                   f"--quality max, at a cost in size and decode speed for a small gain.")
    bigger = [o for o in a.options[: a.options.index(p)] if not o.fits]
    if bigger:
        out.append(f"{bigger[-1].label} would need {gb_text(bigger[-1].total_bytes)} plus the runtime reserve.")
    if p.bits_per_weight < 3.5:
        out.append("Below 4 bits scalar methods lose much quality; 2-bit codebook methods (lowbit's quip and aqlm) "
                   "keep more, and a smaller model at 4 bits is often better than a large one at 2.")
    if p.command:                  # --measure picked the budgeted mix itself
        out.append(f"The pick is a budgeted mix (one scheme per Linear by measured sensitivity, `lowbit quantize "
                   f"--budget`; its size is an upper bound): {a.mix_reason}.")
    elif a.mix is not None and a.mix_command:
        out.append(f"Spend the headroom: {a.mix_reason}. A budgeted mix at {a.mix.linear_bits:.2f} bits per weight over "
                   f"the Linears (one scheme per Linear by measured sensitivity, `lowbit quantize --budget`) takes at "
                   f"most {gb_text(a.mix.weight_bytes)}, {gb_text(a.mix.total_bytes)} with the {extra}. "
                   + evidence_text(MIX_PLANS[a.target]))
    elif p.method is not None:
        out.append(f"{'Budgeted mix not offered' if a.mix is not None else 'No budgeted mix'}: {a.mix_reason}.")
    if p.kl is not None:
        out += measured_reasons(a)
    return out


def measured_reasons(a: Advice) -> list[str]:
    """What --measure found: the pick's numbers and rule, the most faithful option when it is another."""
    p = a.pick
    out = [f"Measured on this model: perplexity {p.perplexity:.3f}, KL to the unquantised model {p.kl:.4g}; "
           f"--quality {a.quality} picks {MEASURED_RULE[a.quality]}."]
    measured = [o for o in a.options + ([a.mix] if a.mix else []) if o.kl is not None]
    best = min(measured, key=lambda o: o.kl)
    if best is not p:
        out.append(f"The most faithful option measured is {best.label} (KL {best.kl:.4g}, perplexity "
                   f"{best.perplexity:.3f}); --quality max picks it.")
    return out
