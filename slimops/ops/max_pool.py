"""Max pooling's CPU inference kernel (csrc/cpu/max_pool.h), for ``slimops.nn.MaxPool2d``.

Not an op family: pooling does not slim, so it has no schema, Triton or CUDA kernel of its own.
Where no gradient is recorded, ``MaxPool2d`` hands a contiguous NCHW CPU batch to
:func:`max_pool2d_inference`, which pools the planes in place with the C++ kernel (the same
result as ``F.max_pool2d`` to the bit) or returns None where that kernel does not run, and the
layer keeps its PyTorch path.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from slimops.ops import _backend

IntPair = Union[int, Tuple[int, ...]]

# slimops._C's entry (csrc/python_module.cpp), None without the extension.
_ENTRY: Optional[Callable[..., object]] = _backend.direct_entry("max_pool2d")


def _pair(v: Optional[IntPair], default: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """``v`` as two ints (an int twice), ``default`` for None; None for any other form."""
    if v is None:
        return default
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v):
        return (v[0], v[1])
    return None


def max_pool2d_inference(input: Tensor, kernel_size: IntPair, stride: Optional[IntPair],
                         padding: IntPair, dilation: IntPair, ceil_mode: bool
                         ) -> Optional[Tensor]:
    """``F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)`` by the C++
    kernel, or None where it does not run: no extension; not a plain, contiguous float32 /
    float64 NCHW CPU tensor; a gradient to record; while ``torch.jit`` traces or
    ``torch.compile`` compiles (the kernel is not an op, so neither would see it); a geometry
    PyTorch would reject (its own call then raises its own error).
    The result is a new contiguous tensor, equal to PyTorch's to the bit (NaN where a window
    holds one; the sign of a zero maximum).
    """
    if (_ENTRY is None or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or type(input) is not torch.Tensor or input.dim() != 4 or not input.is_cpu
            or input.dtype not in (torch.float32, torch.float64) or not input.is_contiguous()
            or (torch.is_grad_enabled() and input.requires_grad) or input.numel() == 0):
        return None
    k = _pair(kernel_size, (0, 0))
    s = _pair(stride, k) if stride != () else k  # F.max_pool2d: stride None or () = kernel
    p = _pair(padding, (0, 0))
    d = _pair(dilation, (1, 1))
    if k is None or s is None or p is None or d is None:
        return None
    if (min(k) < 1 or min(s) < 1 or min(d) < 1 or p[0] < 0 or p[1] < 0
            or p[0] > k[0] // 2 or p[1] > k[1] // 2):
        return None
    for size, kk, ss, pp, dd in zip(input.shape[2:], k, s, p, d):
        if size + 2 * pp - dd * (kk - 1) - 1 < 0:  # an empty output: PyTorch's error
            return None
    out = _ENTRY(input, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1], bool(ceil_mode))
    return None if out is NotImplemented else out  # type: ignore[return-value]


__all__ = ["max_pool2d_inference"]
