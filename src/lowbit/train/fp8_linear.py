"""Linear layers that train in FP8 (Transformer Engine's te.Linear under fp8_autocast, emulated exactly).

Forward:   xq = E4M3(x * s_x), wq = E4M3(W * s_w)          y = (xq @ wq^T) / (s_x s_w) + b
Backward:  gq = E5M2(dy * s_g)                             dx = (gq @ wq) / (s_g s_w)
                                                           dW = (gq^T @ xq) / (s_g s_x),   db = sum(dy)
The casts round to the FP8 grids (nearest-even, saturating; lowbit.formats.minifloat.to_float8), the
products are accumulated in float32, and the scales s_x, s_w, s_g come from delayed scaling
(train/fp8_scaling.py). The weight W is the float32 master copy the optimizer updates (its state is
float32 too); the bias and its gradient stay in high precision, as in TE.

Backends: "emulated" multiplies the decoded FP8 values in float32 (exact: a product of two FP8 values
fits float32's mantissa; only the float32 sums round); "scaled_mm" calls torch._scaled_mm with per-tensor
scales (real FP8 kernels on a GPU); "auto" picks scaled_mm on CUDA and the emulation elsewhere:
torch._scaled_mm does run on this CPU build, with the same results, but hundreds of times slower than the
emulation (benchmarks/fp8_training.py measures it).
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.minifloat import to_float8
from lowbit.train.fp8_scaling import BACKWARD_FORMAT, FORWARD_FORMAT, DelayedScaling, fp8_max, record_amax

BACKENDS = ("auto", "emulated", "scaled_mm")
INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2          # columns of a module's amax history and scales
FORMATS = (FORWARD_FORMAT, FORWARD_FORMAT, BACKWARD_FORMAT)


def fp8_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor, backend: str) -> torch.Tensor:
    """(a @ b) * a_inv * b_inv in float32 for FP8 a [M, K], b [K, N] and float32 scalar inverse scales."""
    if backend == "scaled_mm":   # cuBLASLt wants a row-major and b column-major
        return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=a_inv, scale_b=b_inv,
                                out_dtype=torch.float32)
    return (a.float() @ b.float()) * (a_inv * b_inv)


def _cast(x: torch.Tensor, history, scale, column: int, update: bool, recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 tensor, float32 inverse scale) of x with the column's current scale; when `update`, its amax
    is recorded afterwards, so the scale of the next step follows (delayed scaling)."""
    s = scale[column].clone()
    q = to_float8(x.float() * s, FORMATS[column])   # x * s overflowing float32 is inf: NaN, not saturated
    if update:
        record_amax(history, scale, column, x, fp8_max(FORMATS[column]), recipe)
    return q, 1.0 / s


class Fp8LinearFunction(torch.autograd.Function):
    """y [..., N] = FP8 linear of x [..., K] and weight [N, K] (float32 out); see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, history, scale, recipe, backend, update):
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_inv = _cast(x2, history, scale, INPUT, update, recipe)
        wq, w_inv = _cast(weight, history, scale, WEIGHT, update, recipe)
        y = fp8_mm(xq, x_inv, wq.t(), w_inv, backend)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(xq, x_inv, wq, w_inv)
        # the scaling buffers are updated in place: kept on ctx, not saved (saving checks their versions)
        ctx.state = (history, scale)
        ctx.meta = (recipe, backend, update, x.shape, x.dtype, bias is not None)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xq, x_inv, wq, w_inv = ctx.saved_tensors
        history, scale = ctx.state
        recipe, backend, update, x_shape, x_dtype, has_bias = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1])
        gq, g_inv = _cast(dy2, history, scale, GRAD_OUTPUT, update, recipe)
        dx = fp8_mm(gq, g_inv, wq, w_inv, backend).reshape(x_shape).to(x_dtype)
        dw = fp8_mm(gq.t(), g_inv, xq, x_inv, backend)
        db = dy2.float().sum(0) if has_bias else None
        return dx, dw, db, None, None, None, None, None


class Fp8Linear(nn.Module):
    """nn.Linear that computes in FP8 with delayed scaling. weight [out, in] and bias [out] are float32
    master parameters; buffers fp8_amax_history [amax_history_len, 3] and fp8_scale [3] (columns: input,
    weight, grad_output) are in the state dict, so checkpoints carry the scaling state. Histories are
    updated only in training mode with gradients enabled; evaluation uses the scales as they are. Each
    forward (and backward) records one amax, so one pass per optimizer step is assumed, as TE's
    per-iteration update assumes; activation recomputation would record the forward twice.
    The output has the input's dtype (float32 products, then cast), as TE returns the activation dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 recipe: DelayedScaling = DelayedScaling(), backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise LowbitError(f"unknown FP8 matmul backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.in_features, self.out_features = in_features, out_features
        self.recipe, self.backend = recipe, backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)   # nn.Linear's own initialisation
        self.register_buffer("fp8_amax_history", torch.zeros(recipe.amax_history_len, 3))
        self.register_buffer("fp8_scale", torch.ones(3))

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: DelayedScaling = DelayedScaling(), backend: str = "auto"):
        """An Fp8Linear sharing `linear`'s parameters (made float32: they are the master weights)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe, backend)
        new.weight = linear.weight
        new.weight.data = new.weight.data.float()
        if linear.bias is not None:
            new.bias = linear.bias
            new.bias.data = new.bias.data.float()
        return new.to(linear.weight.device)

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "scaled_mm" if self.weight.is_cuda else "emulated"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.training and torch.is_grad_enabled()
        with torch.autocast(x.device.type, enabled=False):   # the FP8 GEMM sets its own precision
            y = Fp8LinearFunction.apply(x, self.weight, self.bias, self.fp8_amax_history, self.fp8_scale,
                                        self.recipe, self.resolved_backend(), update)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"E4M3 fwd / E5M2 bwd, history {r.amax_history_len} ({r.amax_compute_algo}), margin {r.margin}")


def convert_to_fp8_training(model: nn.Module, recipe: DelayedScaling = DelayedScaling(),
                            backend: str = "auto") -> list[str]:
    """Swap every nn.Linear inside the decoder blocks for an Fp8Linear sharing its parameters; returns
    their full names. Embeddings, norms and lm_head stay in higher precision, as TE leaves them by
    default (the output projection is the most sensitive GEMM and is cheap at these vocabularies).
    Raises LowbitError for a model without decoder blocks or without Linears in them."""
    from lowbit.pipeline.arch import block_list, describe
    from lowbit.pipeline.blocks import block_linears

    path, blocks = block_list(model, describe(model))
    names = []
    for i, block in enumerate(blocks):
        for name, linear in block_linears(block).items():
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, Fp8Linear.from_linear(linear, recipe, backend))
            names.append(f"{path}.{i}.{name}")
    if not names:
        raise LowbitError("no nn.Linear layers in the model's decoder blocks to train in FP8")
    return names


def restore_linears(model: nn.Module) -> int:
    """Swap every Fp8Linear back to an nn.Linear with its (float32 master) parameters; returns how many."""
    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    for name, m in swaps:
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = m.weight
        linear.bias = m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(swaps)
