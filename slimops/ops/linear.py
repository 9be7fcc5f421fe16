"""``slimops.ops.linear``: a linear layer on ``W[:out, :in]`` and ``b[:out]``.

Op surface, fake and autograd. Semantics: ``slimops.reference.linear``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from slimops import reference
from slimops.ops import _backend
from slimops.ops._common import as_int, check_input, check_tensor, register_flops

OP = "linear"
_NATIVE = _backend.native_call(OP)


def linear(
    input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, out_features: Optional[int] = None
) -> Tensor:
    """``input @ weight[:out_features, :in_features].T + bias[:out_features]``.

    Args:
        input: ``[..., in_features]``, ``in_features`` the active width's input size.
        weight: the full shared weight ``[O_full, I_full]`` (never copied).
        bias: the full bias ``[O_full]`` or None.
        out_features: active output features (default ``O_full``).
    """
    check_input(input, OP, min_dims=1)
    check_tensor(weight, input, OP, "weight")
    if weight.dim() != 2:
        raise ValueError(f"slimops.linear: weight must be 2-D, got shape {tuple(weight.shape)}")
    out_features = (weight.shape[0] if out_features is None
                    else as_int(out_features, "slimops.linear: out_features"))
    in_features = input.shape[-1]
    if not 1 <= in_features <= weight.shape[1]:
        raise ValueError(
            f"slimops.linear: input has {in_features} features; the weight takes at most {weight.shape[1]}"
        )
    if not 1 <= out_features <= weight.shape[0]:
        raise ValueError(
            f"slimops.linear: out_features={out_features} must be in [1, {weight.shape[0]}]"
        )
    if bias is not None:
        check_tensor(bias, input, OP, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"slimops.linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
    return linear_unchecked(input, weight, bias, out_features)


def linear_unchecked(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], out_features: int
) -> Tensor:
    """``linear`` for a caller that has validated its arguments (``SlimmableLinear`` checks
    its input against its own weight and width): only the backend is chosen here. At batch 1
    the Python checks were a tenth of the op's time (~5 us of ~60 us). The compiled kernel
    still checks everything it reads (``TORCH_CHECK``), so a wrong argument raises, with a
    terser message."""
    if _backend.use_native(input, weight):
        return _NATIVE(input, weight, bias, out_features)
    return reference.linear(input, weight, bias, out_features)


def _register() -> None:
    @torch.library.register_fake("slimops::linear")
    def _(input, weight, bias, out_features):
        return input.new_empty((*input.shape[:-1], out_features))

    @torch.library.register_fake("slimops::linear_backward_input")
    def _(grad_out, weight, in_features):
        return grad_out.new_empty((*grad_out.shape[:-1], in_features))

    @torch.library.register_fake("slimops::linear_backward_weight")
    def _(grad_out, input, weight):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    # FLOPs: 2 per multiply-add at the active width, as torch's mm formula; each gradient
    # is one GEMM of the forward's size.
    register_flops(torch.ops.slimops.linear,
                   lambda input, weight, *_, out_shape, **__: 2 * math.prod(out_shape)
                   * input[-1])
    register_flops(torch.ops.slimops.linear_backward_input,
                   lambda grad_out, weight, in_features, *_, out_shape, **__:
                   2 * math.prod(grad_out) * in_features)
    register_flops(torch.ops.slimops.linear_backward_weight,
                   lambda grad_out, input, weight, *_, out_shape, **__:
                   2 * math.prod(grad_out) * input[-1])

    # Autograd: a C++ kernel at the Autograd key, csrc/autograd/linear.cpp (the formula in
    # Python cost ~85 us of interpreter and torch.library overhead per call, forward and
    # backward; see csrc/autograd/common.h).


if _backend.HAS_C:
    _register()

__all__ = ["linear", "linear_unchecked"]
