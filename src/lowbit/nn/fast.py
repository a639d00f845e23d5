"""FastPath: runs a quantised module's forward through the fused CPU kernels (lowbit.kernels.fused) when it can.

A module mixes it in, says how its buffers read as a kernel plan (`build_plan`), and calls
`fast_forward(x)` first; None means "run your Python path" (no compiled kernels, autograd through x,
a tensor off the CPU, a compute dtype the kernels do not have, a layout they do not cover). The plan only
points into the module's buffers, so in-place changes are seen; it is dropped when the buffers may be
replaced (`.to()`, `.float()`, `load_state_dict`) and rebuilt on the next call. The Python path
(`python_forward`) stays the reference the kernels are tested against.
"""
from __future__ import annotations

import torch


class FastPath:
    _plan = None   # None: not built yet; False: the kernels do not run this module's weight

    def build_plan(self):
        """A lowbit.kernels.fused.Plan for this module's weight, or None."""
        raise NotImplementedError

    def fast_forward(self, x: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        if not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
            return None
        plan = self._plan
        if plan is None:
            plan = self._plan = self.build_plan() or False
        return plan.matmul(x, self.bias, compute_dtype) if plan else None

    def _apply(self, fn, *args, **kwargs):
        self._plan = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._plan = None
        return super()._load_from_state_dict(*args, **kwargs)
