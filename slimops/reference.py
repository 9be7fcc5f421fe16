"""Pure-PyTorch implementation of every slimops op: the test oracle and the fallback path.

Each function here defines the *semantics* of the op of the same name in ``slimops.ops``:
slice the channel prefix of the shared weight, call the stock ``torch.nn.functional`` op,
apply the epilogue. Slicing makes autograd build a full-size gradient for the weight, and
``F.conv2d`` may copy the (non-contiguous) prefix; that is exactly the cost the compiled
kernels avoid, so these functions are the oracle, never the fast path.

Conventions shared by all ops (see ``docs/ARCHITECTURE.md``):

* Weights and biases are always passed *full size*; the active width is given by the
  input's channel count and an explicit output channel count.
* ``conv2d`` with ``groups = G`` views the weight ``[G * Og, Ig, kh, kw]`` as ``G`` blocks of
  ``Og`` rows; group ``g`` uses the first ``og = out_channels // G`` rows of its block and the
  first ``ig = in_channels // G`` input channels (per-group prefixes). With ``G = 1`` this is
  the plain prefix ``W[:out_channels, :in_channels]``. The bias follows the weight's rows.
* ``depthwise_conv2d`` uses ``W[:C]`` of a ``[C_full, 1, kh, kw]`` weight, ``C`` = input channels.
* The fused epilogue is ``act((z + bias) * scale + shift + residual)`` with ``z`` the
  convolution, every term optional, ``scale``/``shift`` of length ``out_channels`` (the active
  width's eval-mode batch norm folded to a per-channel affine map), ``act`` one of
  ``None | "relu" | "relu6"``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# The one table of the fused activations: name -> the integer code the compiled ops take.
# The C++ and CUDA enums (csrc/cpu/common.h, csrc/cuda/epilogue_math.cuh) and the Triton
# kernels' constants (kernels/_common.py, derived from this) are checked against it by
# tests/test_activation_table.py.
ACTIVATION_CODES = {None: 0, "relu": 1, "relu6": 2}
ACTIVATIONS = tuple(ACTIVATION_CODES)

IntPair = Union[int, Sequence[int]]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the batch statistics (``mean``/``var``) the training-mode batch-norm ops
    return and save for their backward (``slimops::batch_norm_act`` on every device and the
    fused ``conv2d_bn_act_train`` / ``depthwise_conv2d_bn_act_train``): fp32 for fp16, bf16
    and fp32 inputs, fp64 for fp64, i.e. never narrower than the input nor than fp32. The
    statistics accumulate in fp32 or wider; storing them in fp16 would round the variance
    the backward takes ``1/std`` from (and cap it at 65504)."""
    return torch.promote_types(dtype, torch.float32)


def _pair(v: IntPair) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {v}")
    return v  # type: ignore[return-value]


def activate(x: Tensor, activation: Optional[str]) -> Tensor:
    """Apply ``None``, ``"relu"`` or ``"relu6"``."""
    if activation is None:
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "relu6":
        return F.hardtanh(x, 0.0, 6.0)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def epilogue(
    z: Tensor,
    bias: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """``act((z + bias) * scale + shift + residual)`` with per-channel (dim 1) vectors."""
    shape = (1, -1) + (1,) * (z.dim() - 2)
    if bias is not None:
        z = z + bias.view(shape)
    if scale is not None:
        z = z * scale.view(shape)
    if shift is not None:
        z = z + shift.view(shape)
    if residual is not None:
        z = z + residual
    return activate(z, activation)


def grouped_prefix(weight: Tensor, groups: int, out_channels: int, in_channels: int) -> Tensor:
    """The active weight ``[out_channels, in_channels // groups, kh, kw]`` (a copy when G > 1)."""
    og, ig = out_channels // groups, in_channels // groups
    w = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])[:, :og, :ig]
    return w.reshape(out_channels, ig, *weight.shape[2:])


def grouped_bias_prefix(bias: Tensor, groups: int, out_channels: int) -> Tensor:
    og = out_channels // groups
    return bias.view(groups, -1)[:, :og].reshape(out_channels)


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    out_channels: int,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """Slimmable (grouped) convolution on per-group channel prefixes, with fused epilogue."""
    in_channels = input.shape[1]
    w = grouped_prefix(weight, groups, out_channels, in_channels)
    b = None if bias is None else grouped_bias_prefix(bias, groups, out_channels)
    z = F.conv2d(input, w, b, _pair(stride), _pair(padding), _pair(dilation), groups)
    return epilogue(z, None, scale, shift, residual, activation)


def depthwise_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """Slimmable depthwise convolution on ``W[:C]``, with fused epilogue."""
    c = input.shape[1]
    b = None if bias is None else bias[:c]
    z = F.conv2d(input, weight[:c], b, _pair(stride), _pair(padding), _pair(dilation), c)
    return epilogue(z, None, scale, shift, residual, activation)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    """Slimmable linear layer on ``W[:out_features, :in_features]`` and ``b[:out_features]``."""
    in_features = input.shape[-1]
    b = None if bias is None else bias[:out_features]
    return F.linear(input, weight[:out_features, :in_features], b)


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
    """One width's batch norm (batch statistics in training), + residual, + activation.

    In training, ``running_mean``/``running_var`` (if given) are updated in place exactly as
    ``F.batch_norm`` does (unbiased variance, exponential average with ``momentum``).
    """
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return activate(y, activation)
