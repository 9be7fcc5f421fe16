"""Helpers shared by the Triton kernel modules."""

from __future__ import annotations

import os
from typing import Any, Sequence, Tuple

import torch

from slimops.reference import ACTIVATION_CODES

# torch dtype -> triton pointer type in AOT signatures.
TRITON_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

# Activation codes, from the one table (slimops/reference.py).
ACT_NONE, ACT_RELU, ACT_RELU6 = (ACTIVATION_CODES[a] for a in (None, "relu", "relu6"))


INT32_MAX = 2 ** 31 - 1


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (numpy), for tests."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def traceable(kernel: Any) -> Any:
    """``kernel`` as the launchers start it, ``traceable(kernel)[grid](*args)``: through
    ``torch.library.wrap_triton``, so that when a launcher runs as the body of a
    ``torch.library.triton_op`` being traced (``slimops.ops.triton_ops``, under
    ``torch.compile``) the launch becomes a graph node holding the kernel; eagerly
    (``triton_ops.eager_launch``, and always under the interpreter) it is the bare kernel.
    Anything that is not a Triton kernel (a test's launch-counting stand-in) is returned
    as is: ``wrap_triton`` would refuse it."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, (JITFunction, Autotuner, InterpretedFunction)):
        return torch.library.wrap_triton(kernel)
    return kernel


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels launch on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not (interpreting() and t.device.type == "cpu"):
            raise ValueError(
                f"slimops.kernels: tensor on {t.device}; Triton kernels run on CUDA tensors "
                "(or on CPU tensors under TRITON_INTERPRET=1)"
            )


def conv_geometry(
    op: str, h: int, w: int, kernel: Sequence[int], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int],
) -> Tuple[int, int, Tuple[int, ...]]:
    """``(ho, wo, stride + padding + dilation)`` of a convolution (the six ints the kernels
    take), with a ``ValueError`` naming ``slimops.kernels.<op>`` for malformed arguments or
    an input too small for the kernel."""

    def pair(v: Sequence[int], name: str, minimum: int) -> Tuple[int, int]:
        t = tuple(int(x) for x in v)
        if len(t) != 2 or min(t) < minimum:
            raise ValueError(f"slimops.kernels.{op}: {name} must be 2 ints >= {minimum}, got {t}")
        return t  # type: ignore[return-value]

    s, p, d = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    kh, kw = int(kernel[0]), int(kernel[1])
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"slimops.kernels.{op}: input {h}x{w} too small for kernel {kh}x{kw}, "
                         f"stride {s}, padding {p}, dilation {d}")
    # The kernels index within a plane in 32 bits (image and plane bases are int64): every
    # coordinate they form must fit, or a large plane would read wrapped addresses.
    extents = (h + 2 * p[0], w + 2 * p[1], d[0] * (kh - 1) + 1, d[1] * (kw - 1) + 1, *s,
               h * w, ho * wo)
    if max(extents) > INT32_MAX:
        raise ValueError(f"slimops.kernels.{op}: the Triton kernels index a plane in 32 bits; "
                         f"input {h}x{w}, kernel {kh}x{kw}, stride {s}, padding {p}, "
                         f"dilation {d} (output {ho}x{wo}) exceed 2^31 - 1")
    return ho, wo, s + p + d


def image_span(t: "torch.Tensor") -> int:
    """How far one image of a [N, ...] tensor reaches through its strides (the largest in-image
    offset + 1): what a kernel offsetting within an image in 32 bits must fit."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:])
                   if size > 0)


def check_int32(op: str, **counts: int) -> None:
    """``ValueError`` when one of ``counts`` (elements a kernel offsets in 32 bits, e.g. one
    image's channels x plane) exceeds 2^31 - 1."""
    for name, value in counts.items():
        if value > INT32_MAX:
            raise ValueError(f"slimops.kernels.{op}: {name} = {value} exceeds the kernels' "
                             f"32-bit offsets (2^31 - 1)")
