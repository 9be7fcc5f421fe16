"""``slimops.ops.conv2d``: dense and grouped convolution on per-group weight prefixes.

The op surface (argument checks, dispatch to the compiled kernel or the reference), its fake
for tracing, and its autograd formula. Semantics: ``slimops.reference.conv2d``.
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
    as_int,
    check_input,
    check_residual,
    check_tensor,
    check_vector,
    conv_flops,
    conv_geometry,
    conv_output_hw,
    register_flops,
)

OP = "conv2d"


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    out_channels: Optional[int] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """Convolve ``input`` with the channel prefix of the shared ``weight``, epilogue fused.

    Args:
        input: ``[N, C_in, H, W]``; ``C_in`` is the active width's input channel count.
        weight: the full shared weight ``[G * Og, Ig, kh, kw]`` (never copied).
        bias: the full bias ``[G * Og]`` or None.
        out_channels: active output channels (default: all of ``weight``'s).
        groups: ``G``, fixed across widths; group ``g`` uses the first ``out_channels // G``
            rows of its block of ``Og`` rows and the first ``C_in // G`` input channels.
        scale, shift: per-output-channel vectors of length ``out_channels`` (eval-mode BN).
        residual: added before the activation; shape of the output.
        activation: ``None``, ``"relu"`` or ``"relu6"``.

    Returns:
        ``act((conv + bias) * scale + shift + residual)`` of shape ``[N, out_channels, Ho, Wo]``.
    """
    check_input(input, OP, 4)
    check_tensor(weight, input, OP, "weight")
    if weight.dim() != 4:
        raise ValueError(f"slimops.conv2d: weight must be 4-D, got shape {tuple(weight.shape)}")
    groups = as_int(groups, "slimops.conv2d: groups")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(
            f"slimops.conv2d: groups={groups!r} must be a positive int dividing the weight's "
            f"{weight.shape[0]} rows"
        )
    out_channels = (weight.shape[0] if out_channels is None
                    else as_int(out_channels, "slimops.conv2d: out_channels"))
    in_channels = input.shape[1]
    rows_per_group, ig_full = weight.shape[0] // groups, weight.shape[1]
    if out_channels < 1 or out_channels % groups or out_channels // groups > rows_per_group:
        raise ValueError(
            f"slimops.conv2d: out_channels={out_channels} must be a positive multiple of "
            f"groups={groups} and at most {weight.shape[0]}"
        )
    if in_channels < 1 or in_channels % groups or in_channels // groups > ig_full:
        raise ValueError(
            f"slimops.conv2d: input has {in_channels} channels; with groups={groups} and a "
            f"weight of shape {tuple(weight.shape)} it must be a positive multiple of {groups} "
            f"and at most {groups * ig_full}"
        )
    s, p, d = conv_geometry(stride, padding, dilation, "conv2d")
    ho, wo = conv_output_hw(input.shape[2], input.shape[3], weight.shape[2:], s, p, d,
                            "conv2d")
    if bias is not None:
        check_tensor(bias, input, OP, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"slimops.conv2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
    check_vector(scale, out_channels, input, OP, "scale")
    check_vector(shift, out_channels, input, OP, "shift")
    check_residual(residual, (input.shape[0], out_channels, ho, wo), input, OP)
    return conv2d_unchecked(input, weight, bias, out_channels, s, p, d, groups, scale, shift,
                            residual, activation_code(activation, "conv2d"))


def conv2d_unchecked(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: int,
    stride: List[int], padding: List[int], dilation: List[int], groups: int,
    scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
    activation: int,
) -> Tensor:
    """``conv2d`` for a caller that has validated its arguments, in the schema's normal form
    (pairs as lists of ints, the activation as its code): only the backend is chosen here.
    ``SlimConvBNAct``'s inference path calls it with the channel counts and BN scale/shift it
    keeps per width. The compiled kernel still checks what it reads."""
    if _backend.use_native(input, weight):
        return torch.ops.slimops.conv2d.default(
            input, weight, bias, out_channels, stride, padding, dilation, groups, scale, shift,
            residual, activation)
    return reference.conv2d(input, weight, bias, out_channels, stride, padding, dilation,
                            groups, scale, shift, residual, ACTIVATION_NAMES[activation])


def _register() -> None:
    @torch.library.register_fake("slimops::conv2d")
    def _(input, weight, bias, out_channels, stride, padding, dilation, groups, scale, shift,
          residual, activation):
        ho, wo = conv_output_hw(input.shape[2], input.shape[3], weight.shape[2:], stride,
                                padding, dilation, "conv2d")
        return input.new_empty((input.shape[0], out_channels, ho, wo))

    @torch.library.register_fake("slimops::conv2d_backward_input")
    def _(grad_z, weight, input_size, stride, padding, dilation, groups):
        return grad_z.new_empty(input_size)

    @torch.library.register_fake("slimops::conv2d_backward_weight")
    def _(grad_z, input, weight, stride, padding, dilation, groups):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    # FLOPs at the active width: the input's channels per group (not the weight's).
    register_flops(torch.ops.slimops.conv2d,
                   lambda input, weight, bias, out_channels, stride, padding, dilation, groups,
                   *_, out_shape, **__: conv_flops(out_shape, input[1] // groups, weight[2:]))
    register_flops(torch.ops.slimops.conv2d_backward_input,
                   lambda grad_z, weight, input_size, stride, padding, dilation, groups, *_,
                   out_shape, **__: conv_flops(grad_z, input_size[1] // groups, weight[2:]))
    register_flops(torch.ops.slimops.conv2d_backward_weight,
                   lambda grad_z, input, weight, stride, padding, dilation, groups, *_,
                   out_shape, **__: conv_flops(grad_z, input[1] // groups, weight[2:]))

    # Autograd: a C++ kernel at the Autograd key, csrc/autograd/conv2d.cpp (the formula in
    # Python cost ~85 us of interpreter and torch.library overhead per call, forward and
    # backward; see csrc/autograd/common.h).


if _backend.HAS_C:
    _register()

__all__ = ["conv2d", "conv2d_unchecked"]
