"""`lowbit qat` end to end: load a model, fake-quantise its Linears, train with the shared loop (progress,
checkpoints, resume), convert to real quantised weights, measure held-out perplexity before and after, and
save a native lowbit folder with the loss curve and a summary beside the weights."""
from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.train.loop import LoopSettings, check_seq_len, train_loop, write_loss_curve
from lowbit.train.qat import QATSettings, convert_qat, prepare_qat

SUMMARY_FILE, CURVE_FILE = "lowbit_qat.json", "qat_loss.png"
EVAL_TOKENS_DURING = 16384     # held-out tokens scored at each evaluation during training (a quick signal)


@dataclass(frozen=True)
class QATJob:
    """What `lowbit qat` is asked: the model folder (None: bundled), the scheme's short words, the output
    folder, and whether to distil from the float model (KL to its next-token distribution, as LLM-QAT does)
    or train on the text's next tokens. The training text defaults to the bundled calibration text: text
    the bundled model never trained on, so the float model's distribution there is what it generalises to.
    init: "gptq" (start from GPTQ's solution on the scheme, calibrated on the bundled calibration text: its
    weights and scales) or "rtn" (min-max round-to-nearest)."""
    model: str | None
    scheme: str
    out: str
    distill: bool = True
    init: str = "gptq"
    train_text: str | None = None
    eval_text: str | None = None
    checkpoint_dir: str | None = None
    fit_context: bool = False      # shorten the training windows to the model's context when it is shorter

    def checkpoints(self) -> Path:
        out = Path(self.out)
        return Path(self.checkpoint_dir) if self.checkpoint_dir else out.with_name(out.name + ".checkpoints")


def distillation_loss(teacher):
    """KL(teacher || student) per token, mean over the batch's tokens (nats): the student matches the
    float model's whole next-token distribution, not only the one observed token."""
    def loss_fn(model, batch):
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=batch).logits.float(), dim=-1)
        logp = F.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
        return F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
    return loss_fn


def held_out(model, ids: torch.Tensor, context: int) -> float:
    from lowbit.eval.perplexity import perplexity

    with torch.no_grad():
        return perplexity(model, ids, context).nll


def run_qat(job: QATJob, loop: LoopSettings, qat: QATSettings = QATSettings(), progress: bool = True) -> dict:
    """Train, convert, save. Returns the summary written to OUT/lowbit_qat.json."""
    from lowbit.api import load_model
    from lowbit.data import bundled_text
    from lowbit.eval.evaluate import DEFAULT_MAX_EVAL_TOKENS, tokenize
    from lowbit.eval.windows import model_context
    from lowbit.methods import parse_method
    from lowbit.pipeline.loading import resolve_model_path

    config = parse_method(f"qat-{job.scheme}")
    qat.check(config.spec())   # --act-bits with a scheme W8A8 cannot hold: before loading and GPTQ
    model, tokenizer = load_model(job.model)
    if tokenizer is None:
        raise LowbitError(f"{resolve_model_path(job.model)} has no tokenizer; QAT needs one to read the text")
    if job.fit_context:
        loop = replace(loop, seq_len=min(loop.seq_len, model_context(model)))
    check_seq_len(model, loop.seq_len)   # before GPTQ, not after it
    model = model.float()
    train_ids = tokenize(tokenizer, job.train_text if job.train_text is not None else bundled_text("calibration"),
                         what="training text")
    eval_ids = tokenize(tokenizer, job.eval_text if job.eval_text is not None else bundled_text("eval"),
                        DEFAULT_MAX_EVAL_TOKENS)
    context = min(model_context(model), loop.seq_len)
    teacher = copy.deepcopy(model).eval() if job.distill else None
    float_nll = held_out(model, eval_ids, model_context(model))
    prepare_qat(model, config, qat, starting_weights(model, job, tokenizer))
    start_nll = held_out(model, eval_ids, model_context(model))
    run = {"model": str(resolve_model_path(job.model)), "scheme": config.short_name(), "qat": asdict(qat),
           "init": job.init, "distill": job.distill}
    quick = eval_ids[:EVAL_TOKENS_DURING]
    history = train_loop(model, [p for p in model.parameters() if p.requires_grad], train_ids, loop,
                         checkpoint_dir=job.checkpoints(), run=run, progress=progress,
                         evaluate=lambda m: held_out(m, quick, context),
                         loss_fn=distillation_loss(teacher) if teacher is not None else _next_token_loss)
    fake_nll = held_out(model, eval_ids, model_context(model))
    description = (f"QAT: {history.steps_done} steps x {loop.batch_size} x {loop.seq_len} tokens "
                   f"({'distilled from the float model' if job.distill else 'next-token loss'})")
    convert_qat(model, description)
    summary = _summary(job, config, loop, qat, history, float_nll, start_nll, fake_nll,
                       held_out(model, eval_ids, model_context(model)), eval_ids.numel())
    from lowbit.io.native import save

    save(model, job.out, tokenizer, extra=lambda folder: _write_beside(folder, summary, history, config.short_name()))
    shutil.rmtree(job.checkpoints(), ignore_errors=True)   # the run is complete; its folder is the result
    return summary


INITS = ("rtn", "gptq")


def starting_weights(model, job: QATJob, tokenizer) -> dict | None:
    """{Linear name: QuantizedTensor} of the post-training solution QAT starts from (None: round-to-nearest)."""
    if job.init not in INITS:
        raise LowbitError(f"--init must be one of {', '.join(INITS)}, got {job.init!r}")
    if job.init == "rtn":
        return None
    from lowbit.api import quantize
    from lowbit.io import quantized_weights
    from lowbit.methods import parse_method

    ptq = quantize(copy.deepcopy(model), parse_method(f"gptq-{job.scheme}"), tokenizer=tokenizer)
    return quantized_weights(ptq)


def _next_token_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _summary(job, config, loop, qat, history, float_nll, start_nll, fake_nll, quant_nll, eval_tokens) -> dict:
    return {"model": job.model or "bundled", "method": config.short_name(), "distill": job.distill,
            "loop": asdict(loop), "qat": asdict(qat), "steps": history.steps_done, "tokens": history.tokens,
            "train_seconds": history.seconds, "stopped": history.stopped, "eval_tokens": eval_tokens,
            "init": job.init,
            "perplexity": {"float": math.exp(float_nll), "start": math.exp(start_nll),
                           "qat_fake_quant": math.exp(fake_nll), "qat": math.exp(quant_nll)},
            "losses": history.losses, "evals": history.evals}


def _write_beside(out: Path, summary: dict, history, name: str) -> None:
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    distilled = summary["distill"]
    write_loss_curve(out / CURVE_FILE, {name: history}, eval_axis="held-out NLL (nats/token)" if distilled else None,
                     title=f"{name}: {'KL to the float model' if distilled else 'next-token loss'} and held-out NLL")


def render(summary: dict, out) -> str:
    p = summary["perplexity"]
    return (f"{summary['method']} on {summary['model']}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
            f"{summary['train_seconds'] / 60:.1f} min ({'distilled' if summary['distill'] else 'next-token loss'})\n"
            f"held-out perplexity ({summary['eval_tokens']:,} tokens): float {p['float']:.3f}, "
            f"start ({summary['init']}) {p['start']:.3f}, after QAT {p['qat']:.3f}\n"
            f"saved to {out} (native lowbit folder; {CURVE_FILE} and {SUMMARY_FILE} beside the weights)")


__all__ = ["QATJob", "run_qat", "render", "distillation_loss"]
