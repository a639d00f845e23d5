"""FastPath: runs a quantised module's forward through the fused CPU kernels (lowbit.kernels.fused) when it can.

A module mixes it in, says how its buffers read as a kernel plan (`build_plan`), and calls
`fast_forward(x)` first; None means "run your Python path" (no compiled kernels, autograd through x,
a tensor neither on the CPU nor on a CUDA device with Triton, a compute dtype the kernels do not have, a
layout they do not cover). CUDA tensors go to the Triton kernel (lowbit.kernels.triton_wo) for modules
whose build_plan takes another plan builder (GPU_PLANS); LOWBIT_KERNELS=0 turns both off. A GPU plan holds
float32 copies of the scales (and decoded zero points / nested absmax), made when it is built: in-place
changes to those buffers need `.to()` or load_state_dict (which drop the plans) to be seen on the GPU. The plan only
points into the module's buffers, so in-place changes are seen; it is dropped when the buffers may be
replaced (`.to()`, `.float()`, `load_state_dict`) and rebuilt on the next call. The Python path
(`python_forward`) stays the reference the kernels are tested against.
"""
from __future__ import annotations

import os
import warnings

import torch


class FastPath:
    _plan = None       # None: not built yet; False: the kernels do not run this module's weight
    _gpu_plan = None   # the same for the Triton kernel (lowbit.kernels.triton_wo), CUDA tensors
    GPU_PLANS = False  # build_plan(make=...) accepts another plan builder with affine_plan's arguments

    def build_plan(self, make=None):
        """A lowbit.kernels.fused.Plan for this module's weight (or `make`'s plan, for modules with
        GPU_PLANS), or None."""
        raise NotImplementedError

    def fast_forward(self, x: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        if x.requires_grad and torch.is_grad_enabled():
            return None
        if x.is_cuda:
            return self._gpu_forward(x, compute_dtype)
        if not x.is_cpu:
            return None
        plan = self._plan
        if plan is None:
            plan = self._plan = self.build_plan() or False
        return plan.matmul(x, self.bias, compute_dtype) if plan else None

    def _gpu_forward(self, x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor | None:
        plan = self._gpu_plan
        if plan is None:
            plan = False
            if self.GPU_PLANS and os.environ.get("LOWBIT_KERNELS", "1").lower() not in ("0", "off", "false", "no"):
                from lowbit.kernels.triton_wo import gpu_affine_plan
                plan = self.build_plan(make=gpu_affine_plan) or False
            self._gpu_plan = plan
        if not plan:
            return None
        try:
            return plan.matmul(x, self.bias, compute_dtype)
        except Exception as e:   # a GPU Triton cannot compile for (no bf16 dot before sm80, shared memory): Python path
            warnings.warn(f"lowbit: the Triton kernel failed on this GPU, using the Python path ({e})", stacklevel=2)
            self._gpu_plan = False
            return None

    def _apply(self, fn, *args, **kwargs):
        self._plan = self._gpu_plan = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._plan = self._gpu_plan = None
        return super()._load_from_state_dict(*args, **kwargs)
