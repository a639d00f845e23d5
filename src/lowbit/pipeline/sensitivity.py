"""Per-layer sensitivity, the input of mixed precision.

For every quantised Linear and every candidate scheme: the loss increase when that Linear *alone* is
rounded with the candidate, measured as KL(p_fp || p_q) of next-token distributions averaged over the
calibration positions (as HAWQ and llama.cpp's importance studies measure it; for an encoder without a
language-model head, 1 - cosine of the mean-pooled embeddings per window), and a cheap proxy, the
Hessian-weighted weight error tr(dW H dW^T) / tokens with H = sum of x x^T over the layer's calibration
inputs (GPTQ's objective: the output error the change causes). Its rank correlation with the measured
loss is printed with every budget plan, since a proxy is only useful for the choices it orders right.

Calibrated candidates with a scheme (GPTQ, AWQ, SpQR ...) are measured by round-to-nearest on their
scheme: their own statistics need the whole pipeline, and RTN orders schemes well. GPTQ's own rounding of
one Linear alone, from its full-precision inputs, orders them worse: it understates what GPTQ's low-bit
layers lose together (all-MiniLM-L6-v2, 3.5 bits per weight: the mix chosen from GPTQ's own single-layer
losses scored a mean cosine of 0.9493, the one chosen from RTN's 0.9673). Candidates without a scheme
that work on one Linear alone (`alone`: QuIP#'s lattice codes, AQLM's codebooks) are measured with the
method itself, from that Linear's own full-precision inputs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.methods.base import MethodConfig, SchemeMethod, parse_method
from lowbit.methods.rtn import RTN
from lowbit.methods.stats import LayerStats


@dataclass
class LayerSensitivity:
    name: str
    numel: int
    bytes: list[int]        # exact stored size of the layer under each candidate
    kl: list[float]         # nats per position, one per candidate
    proxy: list[float]      # tr(dW H dW^T) / tokens, one per candidate


def candidate_configs(names) -> list[MethodConfig]:
    """Method short names ("gptq-int3-g128,gptq-int4-g128,rtn-int8") or configs -> configs."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    configs = [parse_method(n) if isinstance(n, str) else n for n in names]
    if len(configs) < 2:
        raise LowbitError("mixed precision needs at least two candidate schemes, e.g. gptq-int3-g128,gptq-int4-g128")
    return configs


def measure_rounding(config: MethodConfig) -> MethodConfig:
    """What stands for `config` while measuring sensitivity: the method itself when it needs no
    calibration, round-to-nearest on its scheme when it has one, else the method itself on one Linear
    when it can work alone."""
    from lowbit.pipeline.calibration import needs_calibration

    if not needs_calibration(config):
        return config
    if isinstance(config, SchemeMethod):
        return RTN(scheme=config.scheme)
    if config.alone:
        return config
    raise LowbitError(f"{config.short_name()} has no scheme to round to nearest and cannot be measured one "
                      f"Linear at a time; use it outside the candidates")


def candidate_plans(model: nn.Module, configs: list[MethodConfig], skip: tuple = ()) -> list[dict]:
    """Per candidate, {Linear name: (its config for that layer, LayerInfo)} as the pipeline would run it."""
    from lowbit.methods.recipe import DEFAULT_SKIP, Recipe
    from lowbit.pipeline.runner import layer_plan

    return [layer_plan(model, Recipe(c, skip=tuple(DEFAULT_SKIP) + tuple(skip)))[0] for c in configs]


@torch.inference_mode()
def _logprobs(model: nn.Module, ids: torch.Tensor, batch_size: int, skip=None) -> torch.Tensor:
    """Next-token log-probs [n, L, vocab]. skip: (blocks, k, cached outputs per batch): the first k blocks
    return their full-precision outputs from the cache instead of running (a layer in block k changes
    nothing before it), which halves the cost on average."""
    out = []
    for i, b in enumerate(range(0, ids.shape[0], batch_size)):
        if skip is not None:
            blocks, k, cached = skip
            for j in range(k):
                blocks[j].forward = lambda *a, _v=cached[i][j], **kw: _v
        try:
            out.append(_output(model(input_ids=ids[b:b + batch_size])))
        finally:
            if skip is not None:
                for j in range(skip[1]):
                    del skip[0][j].forward
    return torch.cat(out)


@torch.inference_mode()
def _block_outputs(model: nn.Module, blocks, ids: torch.Tensor, batch_size: int) -> list[list]:
    """What every block returned, per batch: [batch][block]."""
    cached, current = [], []
    handles = [blk.register_forward_hook(lambda mod, inp, out: current.append(out)) for blk in blocks]
    try:
        for b in range(0, ids.shape[0], batch_size):
            current = []
            model(input_ids=ids[b:b + batch_size])
            cached.append(current)
    finally:
        for h in handles:
            h.remove()
    return cached


@torch.inference_mode()
def _layer_inputs(model: nn.Module, module: nn.Linear, ids: torch.Tensor, batch_size: int, skip) -> torch.Tensor:
    """The layer's inputs over every calibration token, float32 [tokens, in]: one layer at a time, so memory
    stays one layer's activations (a Hessian only for a candidate measured by its own method), with the
    earlier blocks skipped."""
    rows = []
    handle = module.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].reshape(-1, inp[0].shape[-1]).float()))
    try:
        _logprobs(model, ids, batch_size, skip)
    finally:
        handle.remove()
    return torch.cat(rows)


def _output(out) -> torch.Tensor:
    """A causal LM's next-token log-probs [b, L, vocab]; an encoder's unit-norm mean-pooled embedding [b, 1, d]."""
    logits = getattr(out, "logits", None)
    if logits is not None:
        return torch.log_softmax(logits.float(), -1)
    pooled = out.last_hidden_state.double().mean(1, keepdim=True)   # float64: 1 - cos is tiny for good layers
    return torch.nn.functional.normalize(pooled, dim=-1)


def _loss(ref: torch.Tensor, out: torch.Tensor, causal: bool) -> float:
    """KL(p_ref || p) per position for log-probs (causal); 1 - cosine per window for unit embeddings."""
    if causal:
        return float((ref.exp() * (ref - out)).sum(-1).mean())
    return float(1 - (ref * out).sum(-1).mean())


@torch.inference_mode()
def sensitivity(model: nn.Module, candidates, ids: torch.Tensor, batch_size: int = 8,
                progress: bool = True, skip: tuple = ()) -> list[LayerSensitivity]:
    """One LayerSensitivity per Linear every candidate quantises (Linears matching `skip` patterns and the
    recipe's default skips left out), on calibration windows ids [n, L]."""
    from lowbit.pipeline.arch import block_list, describe

    plans = candidate_plans(model, candidate_configs(candidates), skip)
    names = [n for n in plans[0] if all(n in p for p in plans)]
    if not names:
        raise LowbitError("the candidates have no Linear in common to allocate")
    modules = dict(model.named_modules())
    model.eval()
    ref = _logprobs(model, ids, batch_size)
    causal = getattr(model(input_ids=ids[:1, :2]), "logits", None) is not None
    blocks = block_list(model, describe(model))[1]
    block_of = {n: plans[0][n][1].layer for n in names}
    cached = _block_outputs(model, blocks, ids, batch_size)
    out = []
    bar = tqdm(names, desc="sensitivity", unit="layer", file=sys.stderr, disable=not progress)
    for name in bar:
        module, row = modules[name], LayerSensitivity(name, modules[name].weight.numel(), [], [], [])
        original = module.weight.data.clone()
        skip = None if block_of[name] is None else (blocks, block_of[name], cached)
        x = _layer_inputs(model, module, ids, batch_size, skip)
        stats = None
        try:
            for plan in plans:
                cfg, info = plan[name]
                stand_in = measure_rounding(cfg).for_layer(info)
                if stand_in.alone and stats is None:      # an in x in Hessian only for a method that reads one
                    stats = LayerStats(x.shape[1])
                    stats.update(x)
                q = stand_in.quantize_weight(original.float(), stats if stand_in.alone else None)
                rounded = q.dequantize().to(original.dtype)
                module.weight.data = rounded
                row.kl.append(_loss(ref, _logprobs(model, ids, batch_size, skip), causal))
                # tr(dW H dW^T) / tokens with H = X^T X, as ||X dW^T||^2: no in x in matrix is formed
                row.proxy.append(float((x @ (rounded - original).float().T).double().pow(2).sum()) / x.shape[0])
                planned = cfg.planned_weight(original.shape, info)
                row.bytes.append(int((planned if planned is not None else q).nbytes))
        finally:
            module.weight.data = original
        out.append(row)
    return out


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties share their mean rank)."""
    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(t):          # mean rank for ties
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    if len(xs) != len(ys) or len(xs) < 2:
        raise LowbitError("rank correlation needs two equally long lists of at least two values")
    a, b = ranks(xs), ranks(ys)
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))
