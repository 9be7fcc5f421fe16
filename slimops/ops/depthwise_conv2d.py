"""``slimops.ops.depthwise_conv2d``: depthwise convolution on ``W[:C]``, epilogue fused.

Op surface, fake and autograd. Semantics: ``slimops.reference.depthwise_conv2d``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from slimops import reference
from slimops.ops import _backend
from slimops.ops._common import (
    ACTIVATION_NAMES,
    IntPair,
    activation_code,
    check_input,
    check_residual,
    check_tensor,
    check_vector,
    conv_flops,
    conv_geometry,
    conv_output_hw,
    register_flops,
)

OP = "depthwise_conv2d"


def depthwise_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """Depthwise convolution of ``input`` ``[N, C, H, W]`` with ``weight[:C]``.

    Args:
        weight: the full shared weight ``[C_full, 1, kh, kw]`` (never copied), ``C <= C_full``.
        bias: the full bias ``[C_full]`` or None.
        scale, shift: per-channel vectors of length ``C``; residual: the output's shape;
        activation: ``None``, ``"relu"`` or ``"relu6"``.

    Returns:
        ``act((conv + bias) * scale + shift + residual)`` of shape ``[N, C, Ho, Wo]``.
    """
    check_input(input, OP, 4)
    check_tensor(weight, input, OP, "weight")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(
            f"slimops.depthwise_conv2d: weight must have shape [C, 1, kh, kw], got {tuple(weight.shape)}"
        )
    c = input.shape[1]
    if c < 1 or c > weight.shape[0]:
        raise ValueError(
            f"slimops.depthwise_conv2d: input has {c} channels; the weight has {weight.shape[0]}"
        )
    s, p, d = conv_geometry(stride, padding, dilation, "depthwise_conv2d")
    ho, wo = conv_output_hw(input.shape[2], input.shape[3], weight.shape[2:], s, p, d,
                            "depthwise_conv2d")
    if bias is not None:
        check_tensor(bias, input, OP, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"slimops.depthwise_conv2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
    check_vector(scale, c, input, OP, "scale")
    check_vector(shift, c, input, OP, "shift")
    check_residual(residual, (input.shape[0], c, ho, wo), input, OP)
    return depthwise_conv2d_unchecked(input, weight, bias, s, p, d, scale, shift, residual,
                                      activation_code(activation, "depthwise_conv2d"))


def depthwise_conv2d_unchecked(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
    padding: List[int], dilation: List[int], scale: Optional[Tensor], shift: Optional[Tensor],
    residual: Optional[Tensor], activation: int,
) -> Tensor:
    """``depthwise_conv2d`` for a caller that has validated its arguments, in the schema's
    normal form (pairs as lists of ints, the activation as its code): only the backend is
    chosen here. The compiled kernel still checks what it reads."""
    if _backend.use_native(input, weight):
        return torch.ops.slimops.depthwise_conv2d.default(
            input, weight, bias, stride, padding, dilation, scale, shift, residual, activation)
    return reference.depthwise_conv2d(input, weight, bias, stride, padding, dilation, scale,
                                      shift, residual, ACTIVATION_NAMES[activation])


def _register() -> None:
    @torch.library.register_fake("slimops::depthwise_conv2d")
    def _(input, weight, bias, stride, padding, dilation, scale, shift, residual, activation):
        ho, wo = conv_output_hw(input.shape[2], input.shape[3], weight.shape[2:], stride,
                                padding, dilation, "depthwise_conv2d")
        return input.new_empty((input.shape[0], input.shape[1], ho, wo))

    @torch.library.register_fake("slimops::depthwise_conv2d_backward_input")
    def _(grad_z, weight, input_size, stride, padding, dilation):
        return grad_z.new_empty(input_size)

    @torch.library.register_fake("slimops::depthwise_conv2d_backward_weight")
    def _(grad_z, input, weight, stride, padding, dilation):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    # FLOPs: one input channel per output channel; each gradient costs the forward's.
    register_flops(torch.ops.slimops.depthwise_conv2d,
                   lambda input, weight, *_, out_shape, **__: conv_flops(out_shape, 1,
                                                                         weight[2:]))
    register_flops(torch.ops.slimops.depthwise_conv2d_backward_input,
                   lambda grad_z, weight, *_, out_shape, **__: conv_flops(grad_z, 1, weight[2:]))
    register_flops(torch.ops.slimops.depthwise_conv2d_backward_weight,
                   lambda grad_z, input, weight, *_, out_shape, **__: conv_flops(grad_z, 1,
                                                                                 weight[2:]))

    # Autograd: a C++ kernel at the Autograd key, csrc/autograd/depthwise_conv2d.cpp (the formula in
    # Python cost ~85 us of interpreter and torch.library overhead per call, forward and
    # backward; see csrc/autograd/common.h).


if _backend.HAS_C:
    _register()

__all__ = ["depthwise_conv2d", "depthwise_conv2d_unchecked"]
