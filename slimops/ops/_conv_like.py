"""What the conv-like op families (``conv2d``, ``depthwise_conv2d``) share in Python.

Both take a 4-D input, the full shared weight ``[rows, Ig, kh, kw]`` and bias ``[rows]``,
stride/padding/dilation pairs and the fused epilogue (``scale``, ``shift``, ``residual``,
``activation``); both have a forward op and two backward ops
(``X_backward_input(grad_z, weight, input_size, stride, padding, dilation, ...)``,
``X_backward_weight(grad_z, input, weight, stride, padding, dilation, ...)``). So their
argument checks after the weight's own, their fakes and their flop formulas are one piece
of code here; a family states only what differs, in a ``ConvLike``: how many channels its
forward writes and how many input channels each output channel reads.

The fakes and flop formulas read the ops' arguments by their schema names (``Args``), not
by position, so that the two families' different argument lists need no index arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from slimops.ops._common import (
    IntPair,
    check_input,
    check_residual,
    check_tensor,
    check_vector,
    conv_flops,
    conv_geometry,
    conv_output_hw,
    register_flops,
)

# An op call's arguments by schema name (tensors, or their shapes in a flop formula).
Args = Mapping[str, Any]


@dataclass(frozen=True)
class ConvLike:
    """What a conv-like family's fakes and flop formulas need to know about it.

    Attributes:
        name: the forward op's name in ``torch.ops.slimops`` (its backward ops are
            ``name + "_backward_input"`` and ``name + "_backward_weight"``).
        out_channels: the forward's active output channel count from its arguments.
        in_channels_per_group: the input channels each output channel reads, from the
            active input channel count and the arguments (the flops' inner dimension).
    """

    name: str
    out_channels: Callable[[Args], int]
    in_channels_per_group: Callable[[int, Args], int]


def check_operands(input: Tensor, weight: Tensor, op: str) -> None:
    """A 4-D floating-point input and a weight tensor of its dtype and device."""
    check_input(input, op, 4)
    check_tensor(weight, input, op, "weight")


def check_geometry_and_epilogue(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: int,
    stride: IntPair, padding: IntPair, dilation: IntPair, scale: Optional[Tensor],
    shift: Optional[Tensor], residual: Optional[Tensor], op: str,
) -> Tuple[List[int], List[int], List[int]]:
    """The checks of a conv-like op after its weight's own: the geometry (and that the
    kernel fits the padded input), the full-size bias ``[weight rows]``, the epilogue's
    vectors (length ``out_channels``) and residual (the output's shape). Returns stride,
    padding and dilation as the schema takes them (pairs of ints)."""
    s, p, d = conv_geometry(stride, padding, dilation, op)
    ho, wo = conv_output_hw(input.shape[2], input.shape[3], weight.shape[2:], s, p, d, op)
    if bias is not None:
        check_tensor(bias, input, op, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"slimops.{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
    check_vector(scale, out_channels, input, op, "scale")
    check_vector(shift, out_channels, input, op, "shift")
    check_residual(residual, (input.shape[0], out_channels, ho, wo), input, op)
    return s, p, d


def _binder(op: Any) -> Callable[[Sequence[Any], Dict[str, Any]], Dict[str, Any]]:
    """A function naming an op call's arguments after ``op``'s schema (an OpOverloadPacket)."""
    names = [a.name for a in op.default._schema.arguments]

    def bind(args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        return {**dict(zip(names, args)), **kwargs}

    return bind


def register(family: ConvLike) -> None:
    """Register the fakes (for ``torch.compile``) and the flop formulas of ``family``'s
    forward and backward ops. Each gradient costs the forward's multiply-adds: the same
    output-sized tensor times the same kernel and input channels per group."""
    forward = getattr(torch.ops.slimops, family.name)
    backward_input = getattr(torch.ops.slimops, f"{family.name}_backward_input")
    backward_weight = getattr(torch.ops.slimops, f"{family.name}_backward_weight")
    bind_forward, bind_input, bind_weight = (
        _binder(forward), _binder(backward_input), _binder(backward_weight))

    @torch.library.register_fake(f"slimops::{family.name}")
    def _(*args: Any, **kwargs: Any) -> Tensor:
        a = bind_forward(args, kwargs)
        input = a["input"]
        ho, wo = conv_output_hw(input.shape[2], input.shape[3], a["weight"].shape[2:],
                                a["stride"], a["padding"], a["dilation"], family.name)
        return input.new_empty((input.shape[0], family.out_channels(a), ho, wo))

    @torch.library.register_fake(f"slimops::{family.name}_backward_input")
    def _(*args: Any, **kwargs: Any) -> Tensor:
        a = bind_input(args, kwargs)
        return a["grad_z"].new_empty(a["input_size"])

    @torch.library.register_fake(f"slimops::{family.name}_backward_weight")
    def _(*args: Any, **kwargs: Any) -> Tensor:
        return torch.empty_like(bind_weight(args, kwargs)["weight"],
                                memory_format=torch.contiguous_format)

    # FLOPs at the active width: the input's channels (per group), not the weight's.
    def forward_flops(*args: Any, out_shape: Sequence[int], **kwargs: Any) -> int:
        a = bind_forward(args, kwargs)
        return conv_flops(out_shape, family.in_channels_per_group(a["input"][1], a),
                          a["weight"][2:])

    def input_flops(*args: Any, out_shape: Sequence[int], **kwargs: Any) -> int:
        a = bind_input(args, kwargs)
        return conv_flops(a["grad_z"], family.in_channels_per_group(a["input_size"][1], a),
                          a["weight"][2:])

    def weight_flops(*args: Any, out_shape: Sequence[int], **kwargs: Any) -> int:
        a = bind_weight(args, kwargs)
        return conv_flops(a["grad_z"], family.in_channels_per_group(a["input"][1], a),
                          a["weight"][2:])

    register_flops(forward, forward_flops)
    register_flops(backward_input, input_flops)
    register_flops(backward_weight, weight_flops)
    # Autograd: C++ kernels at the Autograd key, csrc/autograd/<name>.cpp (the formula in
    # Python cost ~85 us of interpreter and torch.library overhead per call, forward and
    # backward; see csrc/autograd/common.h).
