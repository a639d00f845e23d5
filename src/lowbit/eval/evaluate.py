"""evaluate(): perplexity, fidelity, memory and speed of one model, as one flat dict (a report row)."""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.eval.fidelity import FidelityResult, Reference
from lowbit.eval.memory import model_memory
from lowbit.eval.perplexity import PerplexityResult
from lowbit.eval.scoring import score_windows
from lowbit.eval.speed import measure_speed
from lowbit.eval.windows import Windows, model_context, split_windows
from lowbit.pipeline.samples import check_token_ids

DEFAULT_MAX_EVAL_TOKENS = 16384
SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "tokens_per_s", "speed_protocol")

MEMORY_PROTOCOL = ("quantised Linears as held (codes, scales, zeros) + every other weight at fp16 "
                   "(the unquantised baseline row: all weights at its storage precision); the CPU model "
                   "computes in fp32, so memory_held_bytes is larger")


def bundled_eval_text() -> str:
    from lowbit.data import bundled_text

    return bundled_text("eval")


def tokenize(tokenizer, text: str, max_tokens: int | None = None, what: str = "eval text") -> torch.Tensor:
    """int64 token ids of `text`, cut to max_tokens (`what` names the text in errors). Documents separated by a `<|endoftext|>` line (the
    bundled corpus format) are encoded one by one, each with the tokenizer's special tokens (a BOS),
    and concatenated: every document then starts the way a prompt does."""
    from lowbit.data import DOCUMENT_SEPARATOR

    if tokenizer is None:
        raise LowbitError("a tokenizer is needed to evaluate on text")
    documents = [d for d in text.split(DOCUMENT_SEPARATOR) if d.strip()]
    if not documents:
        raise LowbitError(f"the {what} is empty")
    encoded = tokenizer(documents, verbose=False)["input_ids"]
    ids = torch.tensor([t for doc in encoded for t in doc], dtype=torch.int64)
    return ids[:max_tokens] if max_tokens else ids


def eval_windows(model, tokenizer=None, text: str | None = None, ids=None, context: int | None = None,
                 max_eval_tokens: int | None = DEFAULT_MAX_EVAL_TOKENS) -> Windows:
    """The scoring windows: from `ids` if given, else from `text` (default: the bundled eval text)."""
    if ids is None:
        ids = tokenize(tokenizer, bundled_eval_text() if text is None else text, max_eval_tokens)
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)[:max_eval_tokens]
    check_token_ids(model, ids)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and limit and context > limit:
        raise LowbitError(f"--context {context} is longer than the model's context of {limit} positions")
    return split_windows(ids, context or model_context(model))


def evaluate(model, tokenizer=None, text: str | None = None, reference: Reference | None = None, *,
             ids=None, context: int | None = None, max_eval_tokens: int | None = DEFAULT_MAX_EVAL_TOKENS,
             speed: bool = True, float_bytes: int = 2, batch_size: int = 8, progress: bool = False) -> dict:
    """Perplexity (and with a reference: delta-PPL, KL, top-1), memory and speed of `model`.

    With a reference, the reference's windows are scored (text, ids and context are then not used).
    `float_bytes` is the storage width of the tensors left unquantised (2 = fp16) in `memory_bytes`.
    progress: a bar over the scored windows on stderr.
    """
    windows = reference.windows if reference is not None else eval_windows(
        model, tokenizer, text, ids, context, max_eval_tokens)
    ref_lp = None if reference is None else reference.logprobs
    scores, _ = score_windows(model, windows, ref_lp, batch_size=batch_size, progress=progress)
    row = perplexity_fields(PerplexityResult.from_scores(scores, windows))
    if reference is not None:
        row.update(fidelity_fields(FidelityResult.from_scores(scores), reference))
        row["delta_ppl"] = delta_ppl(row)
    row.update(memory_fields(model, float_bytes))
    row.update(speed_fields(model, windows) if speed else dict.fromkeys(SPEED_KEYS))
    return row


def perplexity_fields(ppl: PerplexityResult) -> dict:
    return {"perplexity": ppl.perplexity, "nll": ppl.nll, "n_scored": ppl.n_scored, "context": ppl.context,
            "protocol": ppl.protocol}


def fidelity_fields(fid: FidelityResult, reference: Reference) -> dict:
    return {"kl": fid.kl, "top1": fid.top1, "fidelity_positions": fid.n_positions,
            "reference_perplexity": reference.perplexity.perplexity, "fidelity_protocol": reference.protocol()}


def delta_ppl(row: dict) -> float:
    return row["perplexity"] - row["reference_perplexity"]


def memory_fields(model, float_bytes: int) -> dict:
    mem = model_memory(model)
    return {"bits_per_weight": mem.bits_per_weight or 8.0 * float_bytes,
            "memory_bytes": mem.deployed_bytes(float_bytes), "memory_held_bytes": mem.total_bytes,
            "quantized_linears": mem.quantized_linears, "quantized_linear_bytes": mem.quantized_linear_bytes,
            "quantized_linear_fp16_bytes": mem.quantized_linear_fp16_bytes,
            "quantized_linear_ratio": mem.quantized_linear_ratio, "memory_protocol": MEMORY_PROTOCOL}


def speed_fields(model, windows: Windows) -> dict:
    s = measure_speed(model, windows.ids[0], prefill_tokens=windows.context)
    return {"prefill_tokens_per_s": s.prefill_tokens_per_s, "decode_tokens_per_s": s.decode_tokens_per_s,
            "tokens_per_s": s.decode_tokens_per_s, "speed_protocol": s.protocol()}
