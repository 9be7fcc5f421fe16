"""``slimops.ops.depthwise_conv2d``: depthwise convolution on ``W[:C]``, epilogue fused.

Op surface; fakes and flop formulas from ``slimops.ops._conv_like`` (shared with
``conv2d``), autograd in C++ (csrc/autograd/depthwise_conv2d.cpp). Semantics:
``slimops.reference.depthwise_conv2d``.
"""

from __future__ import annotations

from typing import List, Optional

from torch import Tensor

from slimops import reference
from slimops.ops import _backend, _conv_like
from slimops.ops._common import ACTIVATION_NAMES, IntPair, activation_code

OP = "depthwise_conv2d"
_NATIVE = _backend.native_call(OP)
# ``depthwise_conv2d_unchecked`` on the CPU kernel, which checks every argument itself; None
# where that kernel does not run or rejected one (``_backend.cpu_kernel_call``). For the
# layers' per-call inference path.
depthwise_conv2d_cpu_kernel = _backend.cpu_kernel_call(OP)


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
    _conv_like.check_operands(input, weight, OP)
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(
            f"slimops.depthwise_conv2d: weight must have shape [C, 1, kh, kw], got {tuple(weight.shape)}"
        )
    c = input.shape[1]
    if c < 1 or c > weight.shape[0]:
        raise ValueError(
            f"slimops.depthwise_conv2d: input has {c} channels; the weight has {weight.shape[0]}"
        )
    s, p, d = _conv_like.check_geometry_and_epilogue(
        input, weight, bias, c, stride, padding, dilation, scale, shift, residual, OP)
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
        return _NATIVE(input, weight, bias, stride, padding, dilation, scale, shift, residual,
                       activation)
    return reference.depthwise_conv2d(input, weight, bias, stride, padding, dilation, scale,
                                      shift, residual, ACTIVATION_NAMES[activation])


# Fakes and flops (autograd: csrc/autograd/depthwise_conv2d.cpp). The output has the
# input's channels, each reading one input channel.
FAMILY = _conv_like.ConvLike(
    OP, out_channels=lambda a: a["input"].shape[1],
    in_channels_per_group=lambda in_channels, a: 1)

if _backend.HAS_C:
    _conv_like.register(FAMILY)

__all__ = ["depthwise_conv2d", "depthwise_conv2d_unchecked"]
