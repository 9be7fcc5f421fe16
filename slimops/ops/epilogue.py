"""The fused epilogue's backward, shared by the convolution op families.

Forward, every conv op ends with ``act((z + bias) * scale + shift + residual)`` in the same
pass over its output; ``slimops::epilogue_backward`` is the one kernel its gradient needs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from slimops.ops import _backend


def epilogue_grads(
    grad_out: Tensor, out: Tensor, scale: Optional[Tensor], activation: int, need_pre: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients through the fused epilogue ``act(z * scale + shift + residual)``.

    Returns ``(grad_z, grad_pre)``: w.r.t. the convolution output ``z`` and, if ``need_pre``,
    w.r.t. the activation's input (which is also the gradient of ``shift``'s broadcast and of
    ``residual``). The activation's mask is read from the op's output, so nothing else is saved.
    """
    grad_pre = None
    if need_pre or scale is None:
        grad_pre = (
            torch.ops.slimops.epilogue_backward(grad_out, out, None, activation)
            if activation
            else grad_out
        )
    if scale is None:
        return grad_pre, (grad_pre if need_pre else None)
    return torch.ops.slimops.epilogue_backward(grad_out, out, scale, activation), grad_pre


def _register() -> None:
    @torch.library.register_fake("slimops::epilogue_backward")
    def _(grad_out, out, scale, activation):
        return torch.empty_like(grad_out, memory_format=torch.contiguous_format)


if _backend.HAS_C:
    _register()
