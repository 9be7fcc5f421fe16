"""``slimops.ops.conv2d_bn_act_train``: convolution + training-mode switchable BN + residual
+ activation, with the batch statistics reduced in the convolution's epilogue on the GPU.

Training-mode BN needs each channel's mean and variance of the conv output ``z`` before it
can normalise it. Run as two ops, the statistics cost one extra read of ``z`` per layer; on
the GPU every layer of the paper's models is memory-bound (docs/GPU_KERNELS.md), so that
read is a real share of the step. Here the Triton conv writes per-tile moments of ``z``
(count, mean, sum of squared deviations) while ``z`` is still in registers
(``slimops.kernels.conv2d.conv2d_with_stats``) and the BN kernels merge them (Chan's
formula, a fixed tree) and normalise (``batch_norm_act_from_partials``).

Saved statistics: the ops return (and save for the backward) ``mean``/``var`` in
``stats_dtype(input.dtype)`` (``slimops.reference``), fp32 for fp16/bf16 inputs (the
input's dtype for fp32 and fp64), as ``slimops::batch_norm_act`` does on every device, so a
half-precision layer's variance is neither rounded nor capped at fp16's 65504 before the
backward recomputes ``1/std`` from it. The wrappers ``conv2d_bn_act_train`` /
``depthwise_conv2d_bn_act_train`` hand the caller those statistics as they are:
``update_running_stats`` folds them into running statistics of any dtype (fp32 buffers
under autocast take them unrounded; no cast launches).

The op is defined from Python (``torch.library.custom_op``), not in csrc/ops.cpp: it is a
training-only composite of two existing ops, its one fused implementation is the Triton one
(CUDA), and its implementation on every other device is exactly those two ops. Its autograd
is the two ops' backward ops. ``slimops.nn.SlimConvBNAct`` uses it in training on CUDA
tensors; ``depthwise_conv2d_bn_act_train`` is the same for a depthwise conv (the Triton
depthwise kernel's epilogue reduces the statistics).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from slimops import kernels
from slimops.reference import stats_dtype
from slimops.ops import _backend, triton_ops
from slimops.ops._common import (
    channel_sum,
    conv_flops,
    conv_output_hw,
    pad_prefix,
    register_flops,
)
from slimops.ops.epilogue import epilogue_grads

QUALNAME = "slimops::conv2d_bn_act_train"

# The ops' arguments, in schema order: their backward returns one gradient per name.
CONV_ARGS = ("input", "weight", "bias", "out_channels", "stride", "padding", "dilation",
             "groups", "bn_weight", "bn_bias", "eps", "residual", "activation")
DEPTHWISE_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "bn_weight",
                  "bn_bias", "eps", "residual", "activation")


def _bn_backward(grad_out: Tensor, z: Tensor, out: Tensor, bn_weight: Optional[Tensor],
                 mean: Tensor, var: Tensor, eps: float, activation: int
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """``slimops::batch_norm_act_backward`` with the saved statistics, as they were saved:
    ``stats_dtype(z.dtype)`` is what every implementation of the backward takes (the
    ``batch_norm_act`` op's own statistics dtype)."""
    return torch.ops.slimops.batch_norm_act_backward(grad_out, z, out, bn_weight, mean, var,
                                                     eps, True, activation)


def _backward(ctx, grad_out: Tensor, arg_names: Tuple[str, ...],
              grad_input_of: Callable[[Tensor, Tensor, Tensor], Tensor],
              grad_weight_of: Callable[[Tensor, Tensor, Tensor], Tensor],
              grad_bias_of: Callable[[Tensor], Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The backward of both fused training ops: the BN + activation backward gives the conv
    output's gradient, from which the conv's own backward ops give the rest. Gradients are
    computed for the arguments that need one, by name (``arg_names``: the op's schema)."""
    input, weight, bn_weight, z, out, mean, var = ctx.saved_tensors
    needs = dict(zip(arg_names, ctx.needs_input_grad))
    grad_z, grad_bn_weight, grad_bn_bias = _bn_backward(
        grad_out, z, out, bn_weight, mean, var, ctx.eps, ctx.activation)
    grads = {"bn_weight": grad_bn_weight if needs["bn_weight"] else None,
             "bn_bias": grad_bn_bias if needs["bn_bias"] else None}
    if needs["input"]:
        grads["input"] = grad_input_of(grad_z, input, weight)
    if needs["weight"]:
        grads["weight"] = grad_weight_of(grad_z, input, weight)
    if needs["bias"]:
        grads["bias"] = grad_bias_of(grad_z)
    if needs["residual"]:
        grads["residual"] = epilogue_grads(grad_out, out, None, ctx.activation, True)[1]
    return tuple(grads.get(name) for name in arg_names)


def _bn_act_after(z: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                  eps: float, residual: Optional[Tensor], activation: int
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The unfused ops' second half on the conv output ``z``: the ``batch_norm_act`` op in
    training mode. Returns the fused ops' ``(out, z, mean, var)``."""
    out, mean, var = torch.ops.slimops.batch_norm_act(z, bn_weight, bn_bias, None, None, True,
                                                      eps, residual, activation)
    # Already stats_dtype(z.dtype): the op's statistics are the fused ops'.
    return out, z, mean, var


def _bn_act_from_moments(z: Tensor, moments: Tensor, bn_weight: Optional[Tensor],
                         bn_bias: Optional[Tensor], eps: float, residual: Optional[Tensor],
                         activation: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused paths' second half: batch norm of the conv output ``z`` from the per-tile
    ``moments`` its Triton kernel wrote (imports triton on first use). Returns the fused
    ops' ``(out, z, mean, var)``, mean/var fp32 (stats_dtype of the Triton kernels'
    dtypes)."""
    from slimops.kernels.batch_norm_act import batch_norm_act_from_partials

    count = z.numel() // z.shape[1]
    out, mean, var = batch_norm_act_from_partials(z, moments, count, bn_weight, bn_bias, eps,
                                                  residual, activation)
    return out, z, mean, var


def _two_ops(input: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: int,
             stride: List[int], padding: List[int], dilation: List[int], groups: int,
             bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
             residual: Optional[Tensor], activation: int
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    z = torch.ops.slimops.conv2d(input, weight, bias, out_channels, stride, padding, dilation,
                                 groups, None, None, None, 0)
    return _bn_act_after(z, bn_weight, bn_bias, eps, residual, activation)


def _triton(input: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: int,
            stride: List[int], padding: List[int], dilation: List[int], groups: int,
            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
            residual: Optional[Tensor], activation: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused path: statistics from the conv's epilogue (imports triton on first use)."""
    from slimops.kernels.conv2d import conv2d_with_stats

    with triton_ops.eager_launch():  # real tensors: plain launches
        z, moments = conv2d_with_stats(input, weight, bias, out_channels, stride, padding,
                                       dilation, groups)
        return _bn_act_from_moments(z, moments, bn_weight, bn_bias, eps, residual, activation)


def _define() -> None:
    @torch.library.custom_op(QUALNAME, mutates_args=())
    def conv2d_bn_act_train_op(
        input: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: int,
        stride: List[int], padding: List[int], dilation: List[int], groups: int,
        bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
        residual: Optional[Tensor], activation: int,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(out, z, mean, var)``: ``z`` the conv output (kept for the backward),
        ``mean``/``var`` its batch statistics (biased variance) in
        ``stats_dtype(input.dtype)``."""
        return _two_ops(input, weight, bias, out_channels, stride, padding, dilation, groups,
                        bn_weight, bn_bias, eps, residual, activation)

    if kernels.available():
        conv2d_bn_act_train_op.register_kernel("cuda")(_triton)
    # The conv's FLOPs (out_shape holds the four outputs' shapes; BN adds none, as torch
    # counts no FLOPs for batch norm).
    register_flops(torch.ops.slimops.conv2d_bn_act_train,
                   lambda input, weight, bias, out_channels, stride, padding, dilation, groups,
                   *_, out_shape, **__: conv_flops(out_shape[0], input[1] // groups, weight[2:]))

    @conv2d_bn_act_train_op.register_fake
    def _(input, weight, bias, out_channels, stride, padding, dilation, groups, bn_weight,
          bn_bias, eps, residual, activation):
        ho, wo = conv_output_hw(input.shape[2], input.shape[3], weight.shape[2:], stride,
                                padding, dilation, "conv2d_bn_act")
        shape = (input.shape[0], out_channels, ho, wo)
        stats = dict(dtype=stats_dtype(input.dtype))
        return (input.new_empty(shape), input.new_empty(shape),
                input.new_empty((out_channels,), **stats),
                input.new_empty((out_channels,), **stats))

    def setup_context(ctx, inputs, output):
        (input, weight, bias, out_channels, stride, padding, dilation, groups, bn_weight,
         _bn_bias, eps, _residual, activation) = inputs
        out, z, mean, var = output
        ctx.mark_non_differentiable(z, mean, var)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.eps, ctx.activation = eps, activation
        ctx.bias_rows = None if bias is None else bias.shape[0]
        ctx.save_for_backward(input, weight, bn_weight, z, out, mean, var)

    def backward(ctx, grad_out, _grad_z, _grad_mean, _grad_var):
        stride, padding, dilation, groups = ctx.geometry

        def grad_bias(grad_z: Tensor) -> Tensor:
            g = channel_sum(grad_z).view(groups, -1)
            return pad_prefix(g, ctx.bias_rows // groups).reshape(-1)

        return _backward(
            ctx, grad_out, CONV_ARGS,
            lambda grad_z, input, weight: torch.ops.slimops.conv2d_backward_input(
                grad_z, weight, list(input.shape), stride, padding, dilation, groups),
            lambda grad_z, input, weight: torch.ops.slimops.conv2d_backward_weight(
                grad_z, input, weight, stride, padding, dilation, groups),
            grad_bias)

    conv2d_bn_act_train_op.register_autograd(backward, setup_context=setup_context)


DEPTHWISE_QUALNAME = "slimops::depthwise_conv2d_bn_act_train"


def _dw_two_ops(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                padding: List[int], dilation: List[int], bn_weight: Optional[Tensor],
                bn_bias: Optional[Tensor], eps: float, residual: Optional[Tensor],
                activation: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    z = torch.ops.slimops.depthwise_conv2d(input, weight, bias, stride, padding, dilation,
                                           None, None, None, 0)
    return _bn_act_after(z, bn_weight, bn_bias, eps, residual, activation)


def _dw_triton(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
               padding: List[int], dilation: List[int], bn_weight: Optional[Tensor],
               bn_bias: Optional[Tensor], eps: float, residual: Optional[Tensor],
               activation: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from slimops.kernels.depthwise_conv2d import depthwise_conv2d_with_stats

    with triton_ops.eager_launch():  # real tensors: plain launches
        z, moments = depthwise_conv2d_with_stats(input, weight, bias, stride, padding,
                                                 dilation)
        return _bn_act_from_moments(z, moments, bn_weight, bn_bias, eps, residual, activation)


def _define_depthwise() -> None:
    @torch.library.custom_op(DEPTHWISE_QUALNAME, mutates_args=())
    def depthwise_conv2d_bn_act_train_op(
        input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
        padding: List[int], dilation: List[int], bn_weight: Optional[Tensor],
        bn_bias: Optional[Tensor], eps: float, residual: Optional[Tensor], activation: int,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The depthwise counterpart of ``conv2d_bn_act_train``: ``(out, z, mean, var)``."""
        return _dw_two_ops(input, weight, bias, stride, padding, dilation, bn_weight, bn_bias,
                           eps, residual, activation)

    if kernels.available():
        depthwise_conv2d_bn_act_train_op.register_kernel("cuda")(_dw_triton)
    register_flops(torch.ops.slimops.depthwise_conv2d_bn_act_train,
                   lambda input, weight, *_, out_shape, **__: conv_flops(out_shape[0], 1,
                                                                         weight[2:]))

    @depthwise_conv2d_bn_act_train_op.register_fake
    def _(input, weight, bias, stride, padding, dilation, bn_weight, bn_bias, eps, residual,
          activation):
        ho, wo = conv_output_hw(input.shape[2], input.shape[3], weight.shape[2:], stride,
                                padding, dilation, "conv2d_bn_act")
        c = input.shape[1]
        shape = (input.shape[0], c, ho, wo)
        stats = dict(dtype=stats_dtype(input.dtype))
        return (input.new_empty(shape), input.new_empty(shape),
                input.new_empty((c,), **stats), input.new_empty((c,), **stats))

    def setup_context(ctx, inputs, output):
        (input, weight, bias, stride, padding, dilation, bn_weight, _bn_bias, eps, _residual,
         activation) = inputs
        out, z, mean, var = output
        ctx.mark_non_differentiable(z, mean, var)
        ctx.geometry = (stride, padding, dilation)
        ctx.eps, ctx.activation = eps, activation
        ctx.bias_rows = None if bias is None else bias.shape[0]
        ctx.save_for_backward(input, weight, bn_weight, z, out, mean, var)

    def backward(ctx, grad_out, _grad_z, _grad_mean, _grad_var):
        stride, padding, dilation = ctx.geometry
        return _backward(
            ctx, grad_out, DEPTHWISE_ARGS,
            lambda grad_z, input, weight: torch.ops.slimops.depthwise_conv2d_backward_input(
                grad_z, weight, list(input.shape), stride, padding, dilation),
            lambda grad_z, input, weight: torch.ops.slimops.depthwise_conv2d_backward_weight(
                grad_z, input, weight, stride, padding, dilation),
            lambda grad_z: pad_prefix(channel_sum(grad_z), ctx.bias_rows))

    depthwise_conv2d_bn_act_train_op.register_autograd(backward, setup_context=setup_context)


def depthwise_conv2d_bn_act_train(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
    padding: List[int], dilation: List[int], bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor], eps: float, residual: Optional[Tensor], activation: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``act(bn_train(depthwise_conv(input)) + residual)`` on ``W[:C]``: ``(out, mean, var)``
    as ``conv2d_bn_act_train`` (on CUDA the depthwise kernel's epilogue reduces the
    statistics)."""
    out, _z, mean, var = torch.ops.slimops.depthwise_conv2d_bn_act_train(
        input, weight, bias, list(stride), list(padding), list(dilation), bn_weight, bn_bias,
        eps, residual, activation)
    return out, mean, var


def conv2d_bn_act_train(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: int,
    stride: List[int], padding: List[int], dilation: List[int], groups: int,
    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
    residual: Optional[Tensor], activation: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``act(bn_train(conv(input)) + residual)`` on the width's prefixes; returns
    ``(out, mean, var)`` (the batch statistics in ``stats_dtype(input.dtype)``, for the
    caller's running-stat update).

    Arguments are the ``slimops::conv2d`` schema's (normalised: lists, an activation code)
    plus the width's γ/β (length ``out_channels``) and ``eps``; callers check them first
    (``SlimConvBNAct`` does, through its layers).
    """
    out, _z, mean, var = torch.ops.slimops.conv2d_bn_act_train(
        input, weight, bias, out_channels, list(stride), list(padding), list(dilation), groups,
        bn_weight, bn_bias, eps, residual, activation)
    return out, mean, var


def fused_train_available(input: Tensor, weight: Optional[Tensor] = None) -> bool:
    """True where training should run ``conv2d_bn_act_train`` (one op) rather than the conv
    op then ``batch_norm_act``: where it has its fused (Triton) implementation, CUDA tensors
    with the Triton conv registered and ``weight`` (the shared conv weight) in the layout
    the kernels read. Elsewhere the two-op path is as fast. The op layer decides this;
    ``SlimConvBNAct`` asks."""
    return (input.device.type == "cuda" and _backend.HAS_C and kernels.available()
            and _backend.cuda_ready() and _backend.use_native(input, weight))


if _backend.HAS_C:
    _define()
    _define_depthwise()

__all__ = ["conv2d_bn_act_train", "depthwise_conv2d_bn_act_train", "fused_train_available"]
