"""``slimops.ops.batch_norm_act``: one width's batch norm + residual + activation, fused.

The training-mode half of switchable batch norm (eval mode folds into the conv epilogue as
a per-channel scale/shift, see ``slimops.nn``). Op surface, fake and autograd. Semantics:
``slimops.reference.batch_norm_act``.

``slimops::batch_norm_act`` returns ``(out, mean, var)``: ``out`` in the input's dtype, the
statistics it normalised with in ``slimops.reference.stats_dtype(input.dtype)`` (fp32 for
fp16/bf16/fp32 inputs, fp64 for fp64) on every implementation: the CPU op (which takes
fp32/fp64 only), the CUDA C++ kernel, the Triton launcher and the fake below. Autograd saves
them as returned, so ``batch_norm_act_backward`` takes ``1/std`` from an unrounded variance;
``update_running_stats`` folds them into running statistics of any dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from slimops import reference
from slimops.ops import _backend
from slimops.ops._common import (
    ACTIVATION_NAMES,
    activation_code,
    check_input,
    check_residual,
    check_vector,
)

OP = "batch_norm_act"
_NATIVE = _backend.native_call(OP)
_NATIVE_UPDATE = _backend.native_call("update_running_stats")


def batch_norm_act(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """``act(batch_norm(input) + residual)``, updating the running stats when training.

    Args:
        input: ``[N, C, *]``.
        weight, bias: the width's private γ and β (length ``C``) or None.
        running_mean, running_var: the width's running statistics (length ``C``); updated in
            place in training with ``momentum`` (unbiased variance), as ``F.batch_norm`` does.
        training: use batch statistics (True) or the running ones (False).
    """
    check_input(input, OP, min_dims=2)
    c = input.shape[1]
    for name, v in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_vector(v, c, input, OP, name)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("slimops.batch_norm_act: eval mode needs running_mean and running_var")
    if training and input.numel() // max(c, 1) <= 1:
        raise ValueError(
            f"slimops.batch_norm_act: expected more than 1 value per channel when training, "
            f"got input of shape {tuple(input.shape)}"
        )
    check_residual(residual, input.shape, input, OP)
    return batch_norm_act_unchecked(input, weight, bias, running_mean, running_var, training,
                                    momentum, eps, residual,
                                    activation_code(activation, "batch_norm_act"))


def batch_norm_act_unchecked(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
    momentum: float, eps: float, residual: Optional[Tensor], activation: int,
) -> Tensor:
    """``batch_norm_act`` for a caller that has validated its arguments
    (``SwitchableBatchNorm2d`` checks the input against its width; its vectors are its own),
    with the activation as its code (``ACTIVATION_CODES``): only the backend is chosen here.
    At batch 1 on a 7x7 plane the Python checks were a third of the op's time. The compiled
    kernel still checks what it reads."""
    if not _backend.use_native(input):
        return reference.batch_norm_act(
            input, weight, bias, running_mean, running_var, training, momentum, eps, residual,
            ACTIVATION_NAMES[activation],
        )
    out, mean, var = _NATIVE(input, weight, bias, running_mean, running_var, training, eps,
                             residual, activation)
    if training and running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, var,
                             input.numel() // input.shape[1], momentum)
    return out


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float) -> None:
    """Fold a batch's statistics (``var`` biased, over ``count`` values per channel) into
    running ones, in place, as ``F.batch_norm`` does: exponential average, unbiased
    variance, ``running * (1 - momentum) + batch * momentum``. O(channels).

    With the compiled extension this is one op (``slimops::update_running_stats``, which
    bumps the tensors' versions as an in-place op does): on CPU its C++ kernel (all four
    tensors of one dtype), on CUDA its Triton kernel (one launch; fp32 statistics fold into
    fp16/bf16/fp32 buffers unrounded). It runs once per BN layer and width in every training
    step, where the aten ops below cost ~15 us on small CPU planes and three to five kernel
    launches on a GPU. Elsewhere, and while torch.compile traces (so the graph holds plain
    aten ops), those ops: ``var``'s unbiasing factor rides on ``add_``'s alpha, so no scalar
    tensor or temporary is made.

    ``mean``/``var`` may be wider than the running statistics (the op's are fp32 for an
    fp16/bf16 input, ``reference.stats_dtype``): the buffers keep their own dtype; on the aten
    path the batch statistics are rounded to it once (``lerp_`` takes no mixed dtypes)."""
    if (_backend.HAS_C and _native_update(running_mean, running_var, mean, var)
            and not torch.compiler.is_compiling()):
        _NATIVE_UPDATE(running_mean, running_var, mean, var, count, momentum)
        return
    with torch.no_grad():
        mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
        running_mean.lerp_(mean, momentum)
        running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * count / (count - 1))


def _native_update(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                   var: Tensor) -> bool:
    """Whether ``slimops::update_running_stats`` has a kernel for these tensors: on CPU (C++)
    one dtype of ``NATIVE_CPU_DTYPES`` throughout; on CUDA (the kernel ``cuda_registration``
    registered) one device, each tensor of ``NATIVE_CUDA_DTYPES``."""
    if running_mean.is_cpu:
        dtype = running_mean.dtype
        return (dtype in _backend.NATIVE_CPU_DTYPES and mean.is_cpu
                and running_var.dtype == mean.dtype == var.dtype == dtype)
    if running_mean.is_cuda and "update_running_stats" in _backend.CUDA_KERNELS:
        device = running_mean.device
        return all(t.device == device and t.dtype in _backend.NATIVE_CUDA_DTYPES
                   for t in (running_mean, running_var, mean, var))
    return False


def _register() -> None:
    @torch.library.register_fake("slimops::batch_norm_act")
    def _(input, weight, bias, running_mean, running_var, training, eps, residual, activation):
        c = input.shape[1]
        stats = reference.stats_dtype(input.dtype)
        return (input.new_empty(input.shape), input.new_empty((c,), dtype=stats),
                input.new_empty((c,), dtype=stats))

    @torch.library.register_fake("slimops::update_running_stats")
    def _(running_mean, running_var, mean, var, count, momentum):
        return None

    # The gradients have the input's dtype, whatever the statistics' (stats_dtype or the
    # input's own: the Triton backward reads both).
    @torch.library.register_fake("slimops::batch_norm_act_backward")
    def _(grad_out, input, out, weight, mean, var, eps, training, activation):
        c = input.shape[1]
        return input.new_empty(input.shape), input.new_empty((c,)), input.new_empty((c,))

    # Autograd: a C++ kernel at the Autograd key, csrc/autograd/batch_norm_act.cpp (the formula in
    # Python cost ~85 us of interpreter and torch.library overhead per call, forward and
    # backward; see csrc/autograd/common.h).


if _backend.HAS_C:
    _register()

__all__ = ["batch_norm_act", "batch_norm_act_unchecked", "update_running_stats"]
