"""``slimops.ops.conv2d``: dense and grouped convolution on per-group weight prefixes.

The op surface (argument checks, dispatch to the compiled kernel or the reference); its
fakes and flop formulas come from ``slimops.ops._conv_like``, which it shares with
``depthwise_conv2d``, its autograd is C++ (csrc/autograd/conv2d.cpp). Semantics:
``slimops.reference.conv2d``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from slimops import reference
from slimops.ops import _backend, _conv_like
from slimops.ops._common import (ACTIVATION_NAMES, IntPair, activation_code, as_int, conv_flops,
                                 register_flops)

OP = "conv2d"
_NATIVE = _backend.native_call(OP)
# ``conv2d_unchecked`` on the CPU kernel, which checks every argument itself; None where
# that kernel does not run or rejected one (``_backend.cpu_kernel_call``). For the layers'
# per-call inference path.
conv2d_cpu_kernel = _backend.cpu_kernel_call(OP)


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
    _conv_like.check_operands(input, weight, OP)
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
    s, p, d = _conv_like.check_geometry_and_epilogue(
        input, weight, bias, out_channels, stride, padding, dilation, scale, shift, residual, OP)
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
        return _NATIVE(input, weight, bias, out_channels, stride, padding, dilation, groups,
                       scale, shift, residual, activation)
    return reference.conv2d(input, weight, bias, out_channels, stride, padding, dilation,
                            groups, scale, shift, residual, ACTIVATION_NAMES[activation])


def conv2d_backward(
    grad_z: Tensor, input: Tensor, weight: Tensor, stride: List[int], padding: List[int],
    dilation: List[int], groups: int,
) -> Tuple[Tensor, Tensor]:
    """Both gradients of ``conv2d`` without its epilogue: ``(grad_input, grad_weight)``,
    ``grad_weight`` full-size (zero outside the active prefix), as the two backward ops give.

    With the compiled extension this is the op ``slimops::conv2d_backward``, the one
    ``conv2d``'s autograd calls when both gradients are needed. On CPU, where oneDNN runs
    the pair (measured per shape, csrc/cpu/route.h), it makes one ``convolution_backward``
    call for both, as the reference style's autograd does, instead of one per gradient; on
    CUDA it runs the two backward kernels. Without the extension, the oracle's gradients.
    Arguments are the backward ops' (normalised: lists); ``grad_z`` is ``[N, out_channels,
    Ho, Wo]``.
    """
    if _backend.use_native(input, weight):
        return torch.ops.slimops.conv2d_backward.default(
            grad_z, input, weight, stride, padding, dilation, groups)
    with torch.enable_grad():
        x, w = input.detach().requires_grad_(), weight.detach().requires_grad_()
        z = reference.conv2d(x, w, None, grad_z.shape[1], stride, padding, dilation, groups)
        grad_input, grad_weight = torch.autograd.grad(z, (x, w), grad_z)
    return grad_input, grad_weight


# Fakes and flops (autograd: csrc/autograd/conv2d.cpp). Each output channel reads the
# input's channels of its group: the active input width over the fixed group count.
FAMILY = _conv_like.ConvLike(
    OP, out_channels=lambda a: a["out_channels"],
    in_channels_per_group=lambda in_channels, a: in_channels // a["groups"])

if _backend.HAS_C:
    _conv_like.register(FAMILY)

    @torch.library.register_fake("slimops::conv2d_backward")
    def _(grad_z: Tensor, input: Tensor, weight: Tensor, *_: object) -> Tuple[Tensor, Tensor]:
        return (input.new_empty(input.shape),
                torch.empty_like(weight, memory_format=torch.contiguous_format))

    # Both gradients: twice a gradient's multiply-adds (each costs the forward's).
    register_flops(torch.ops.slimops.conv2d_backward,
                   lambda grad_z, input, weight, stride, padding, dilation, groups, *_,
                   out_shape, **__: 2 * conv_flops(grad_z, input[1] // groups, weight[2:]))

__all__ = ["conv2d", "conv2d_backward", "conv2d_unchecked"]
