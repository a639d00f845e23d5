"""The advisor's "spend the headroom": a budgeted mix sized to the memory a uniform pick leaves unused.

When the most precise uniform scheme that fits leaves real room and the next larger one does not fit,
`lowbit quantize --budget <bits>bpw` (pipeline/budget.py: one scheme per Linear, the least measured loss
within the budget, an exact knapsack) fills the room instead. Only where the target loads such a model:

  llama.cpp     GGUF holds a ggml type per tensor; candidates are whole k-quant block types (ggml-q2_k ...
                ggml-q8_0), which the GGUF writer copies as they are (io/gguf.py).
  transformers  lowbit's own runtime loads a recipe with one config per Linear; candidates are GPTQ's
                integer grids (pipeline/budget.DEFAULT_SCHEMES).
  vllm          no: vLLM fuses q/k/v and gate/up into one layer each, which takes one scheme
                (io/targets.FUSES_GROUPS), while the knapsack chooses per Linear.
  finetune      no: `lowbit finetune` trains adapters over one 4-bit base scheme (--quant).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lowbit.calc import ModelShape, ModelSize, mix_size, model_size
from lowbit.errors import LowbitError

# Less than a quarter bit per weight above the uniform pick moves only a few layers up: one step of the
# integer-grid ladder (int4-g128 4.125 -> int4-g64 4.25 bits) is the least headroom worth a mix.
MIX_MIN_GAIN = 0.25


@dataclass(frozen=True)
class MixPlan:
    method: str                     # --method of the command
    candidates: tuple[str, ...]     # --candidates; () = the method's defaults
    family: str                     # the candidates in words
    min_bits: float                 # the smallest budget measured (README, Mixed precision under a budget)
    claim: str                      # what the measurements in `evidence` show
    evidence: tuple[tuple[str, str, str], ...]   # README rows quoted: (row, bits per weight, KL to fp32)
    gguf: bool = False              # the GGUF writer types embedding and head by the commonest block type


MIX_PLANS = {
    "llama.cpp": MixPlan(
        "ggml-q4_k", ("ggml-q2_k", "ggml-q3_k", "ggml-q4_k", "ggml-q5_k", "ggml-q6_k", "ggml-q8_0"),
        "k-quant block types Q2_K to Q8_0", 4.0,
        "a k-quant mix beats the uniform file type of its size and comes close to the next larger one",
        (("k-quant mix 5.0 bpw", "4.997", "0.0022"), ("q4_k_m", "4.801", "0.0082"), ("q5_k_m", "5.655", "0.0021"),
         ("k-quant mix 4.0 bpw", "3.995", "0.0093"), ("q3_k_m", "3.857", "0.0187")), gguf=True),
    "transformers": MixPlan(
        "gptq", (), "GPTQ integer grids int2-g64 to int8", 3.25,
        "each GPTQ mix beats the uniform scheme of its size",
        (("mix 3.5 bpw", "3.498", "0.0117"), ("gptq-int3-g32", "3.500", "0.0314"), ("mix 4.5 bpw", "4.500", "0.0037"),
         ("gptq-int4-g32", "4.500", "0.0070"), ("mix 5.0 bpw", "4.999", "0.0022"))),
}
NO_MIX = {
    "vllm": "vLLM fuses q/k/v and gate/up into one layer each, which takes one scheme, while a budgeted mix "
            "chooses per Linear (`lowbit quantize --budget --target vllm` refuses such a mix)",
    "finetune": "`lowbit finetune` trains adapters over one 4-bit base scheme",
}


@dataclass
class Mix:
    plan: MixPlan
    bits: float             # the budget: bits per weight over the quantised Linears (--budget <bits>bpw)
    size: ModelSize         # at most this (calc.mix_size; the knapsack never exceeds the budget)


def candidates(plan: MixPlan) -> list[str]:
    if plan.candidates:
        return list(plan.candidates)
    from lowbit.pipeline.budget import default_candidates

    return default_candidates(plan.method)


def gguf_file_types(plan: MixPlan) -> tuple[str, ...]:
    """The file types the GGUF writer may infer for a mix of the plan's block types (that of the
    commonest one: io/gguf.infer_file_type), which type its embedding and head."""
    if not plan.gguf:
        return ()
    from lowbit.io.gguf import _FILE_TYPE_OF_BLOCK
    from lowbit.methods import parse_method

    return tuple(_FILE_TYPE_OF_BLOCK[parse_method(c).type] for c in candidates(plan))


def spend_headroom(shape: ModelShape, opts: list, pick, target: str, room: float) -> tuple[Mix | None, str]:
    """The budgeted mix that fills `room` (bytes left for the weights once KV cache and reserve are
    counted) above `pick`, the most precise uniform option that fits; else None and why not. `opts`:
    the target's options, most precise first, each with method, label, fits and linear_bits."""
    if pick is None or pick.method is None:
        return None, "nothing fits" if pick is None else "the fp16 model fits"
    if target not in MIX_PLANS:
        return None, NO_MIX[target]
    larger = opts[: opts.index(pick)]
    if not larger or any(o.fits for o in larger):
        return None, f"a more precise uniform option fits ({next(o.label for o in larger if o.fits)})" if larger \
            else "the pick is the target's most precise option"
    plan = MIX_PLANS[target]
    try:
        top = max(8 * model_size(shape, c).linear_bytes / shape.linear_params for c in candidates(plan))
    except LowbitError as e:
        return None, f"the mix's candidates cannot take this shape ({e})"
    rest = mix_size(shape, 0.0, gguf_file_types(plan)).other_bytes
    bits = math.floor(800 * (room - rest) / shape.linear_params) / 100     # 2 decimals, rounded down: it fits
    if bits >= top:
        return None, f"the room holds every Linear at the largest candidate ({top:.2f} bits per weight)"
    if bits < pick.linear_bits + MIX_MIN_GAIN:
        return None, (f"the headroom buys {max(bits - pick.linear_bits, 0):.2f} bits per weight over {pick.label}, "
                      f"less than {MIX_MIN_GAIN}")
    if bits < plan.min_bits:
        return None, f"{bits:.2f} bits per weight is below the smallest mix measured ({plan.min_bits})"
    return Mix(plan, bits, mix_size(shape, bits, gguf_file_types(plan))), (
        f"{larger[-1].label} does not fit, and {pick.label} leaves room for {bits - pick.linear_bits:.2f} more bits "
        f"per weight")


def evidence_text(plan: MixPlan) -> str:
    rows = "; ".join(f"{name} {kl} at {bits} bits" for name, bits, kl in plan.evidence)
    return (f"Measured on the bundled model, {plan.claim} (KL to fp32, README, Mixed precision under a budget): "
            f"{rows}.")


def mix_command(mix: Mix, model: str, target: str, samples: int | None = None) -> str:
    """The commands that make the mix (MODEL stands for a class name); `samples`: the calibration windows
    of its sensitivities and of its calibrated methods (`lowbit quantize --samples`), where measured with
    them (advise --measure), so that the command makes the model measured."""
    cands = f" --candidates {','.join(mix.plan.candidates)}" if mix.plan.candidates else ""
    windows = f" --samples {samples}" if samples else ""
    quantize = f"lowbit quantize {model} --method {mix.plan.method} --budget {mix.bits:.2f}bpw{cands}{windows}"
    if target == "llama.cpp":
        return f"{quantize} --target llama.cpp -o OUT && lowbit export OUT --format gguf --out OUT.gguf"
    return f"{quantize} -o OUT"
