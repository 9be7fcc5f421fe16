"""Argument handling shared by the op families: activation codes, pairs, input checks."""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import operator
import sys
from types import ModuleType
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from slimops.ops.autocast import dtypes_match
from slimops.reference import ACTIVATION_CODES, ACTIVATIONS

IntPair = Union[int, Sequence[int]]

ACTIVATION_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}


def activation_code(activation: Optional[str], op: str) -> int:
    """The C++/Triton code of ``activation`` (None, "relu", "relu6"); ``op`` names the op in
    the error."""
    try:
        return ACTIVATION_CODES[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"slimops.{op}: unknown activation {activation!r}; expected one of {ACTIVATIONS}"
        ) from None


def as_int(v: object, name: str) -> int:
    """``v`` as a Python int: ints and integer scalars (numpy, 0-d tensors' ``__index__``);
    ``TypeError`` for anything else, bools included (``out_channels=True`` is not 1)."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {v!r}") from None


def pair(v: IntPair, name: str) -> List[int]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        return [as_int(v, name)] * 2
    out = [as_int(x, name) for x in v]
    if len(out) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return out


def conv_geometry(
    stride: IntPair, padding: IntPair, dilation: IntPair, op: str
) -> Tuple[List[int], List[int], List[int]]:
    """Stride, padding and dilation as pairs of ints, checked (``op`` names the op in errors)."""
    s = pair(stride, f"slimops.{op}: stride")
    p = pair(padding, f"slimops.{op}: padding")
    d = pair(dilation, f"slimops.{op}: dilation")
    if min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(
            f"slimops.{op}: need stride >= 1, dilation >= 1, padding >= 0; got stride={s}, "
            f"padding={p}, dilation={d}"
        )
    return s, p, d


def conv_output_hw(
    h: int, w: int, kernel: Sequence[int], s: Sequence[int], p: Sequence[int], d: Sequence[int],
    op: str,
) -> Tuple[int, int]:
    """The output's height and width; ``ValueError`` naming ``op`` when the dilated kernel does
    not fit the padded input."""
    ho = (h + 2 * p[0] - d[0] * (kernel[0] - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (kernel[1] - 1) - 1) // s[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(
            f"slimops.{op}: input of spatial size {h}x{w} is too small for kernel "
            f"{tuple(kernel)} with stride {tuple(s)}, padding {tuple(p)}, dilation {tuple(d)}"
        )
    return ho, wo


def check_tensor(t: Tensor, ref: Tensor, op: str, name: str) -> None:
    """``t`` must be a tensor on ``ref``'s device with ``ref``'s dtype (or, under autocast
    where the ops cast their arguments, any float32 / float16 / bfloat16 mix:
    ``slimops.ops.autocast.dtypes_match``)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"slimops.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not dtypes_match(ref, t):
        raise TypeError(f"slimops.{op}: {name} has dtype {t.dtype} but input has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"slimops.{op}: {name} is on {t.device} but input is on {ref.device}")


def check_input(x: Tensor, op: str, dims: Optional[int] = None, min_dims: int = 0) -> None:
    """``x`` must be a floating-point tensor with exactly ``dims`` (or at least ``min_dims``) dims."""
    if not isinstance(x, Tensor):
        raise TypeError(f"slimops.{op}: input must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"slimops.{op}: input must be floating point, got {x.dtype}")
    if (dims is not None and x.dim() != dims) or x.dim() < min_dims:
        want = f"a {dims}-D input" if dims is not None else f"an input of at least {min_dims} dims"
        raise ValueError(f"slimops.{op}: expected {want}, got shape {tuple(x.shape)}")


def check_vector(v: Optional[Tensor], length: int, ref: Tensor, op: str, name: str) -> None:
    if v is None:
        return
    check_tensor(v, ref, op, name)
    if v.dim() != 1 or v.shape[0] != length:
        raise ValueError(
            f"slimops.{op}: {name} must be a vector of length {length}, got shape {tuple(v.shape)}"
        )


def check_residual(r: Optional[Tensor], shape: Sequence[int], ref: Tensor, op: str) -> None:
    if r is None:
        return
    check_tensor(r, ref, op, "residual")
    if tuple(r.shape) != tuple(shape):
        raise ValueError(
            f"slimops.{op}: residual has shape {tuple(r.shape)}, the output has {tuple(shape)}"
        )


def channel_sum(g: Tensor) -> Tensor:
    """Sum over every dim but the channel dim (1)."""
    return g.sum(dim=[0] + list(range(2, g.dim()))) if g.dim() > 2 else g.sum(0)


def pad_prefix(g: Tensor, full: int) -> Tensor:
    """A length-``full`` vector whose prefix is ``g`` and the rest zero (for full-size grads)."""
    return torch.nn.functional.pad(g, (0, full - g.shape[-1]))



FLOP_COUNTER = "torch.utils.flop_counter"
# Formulas waiting for torch.utils.flop_counter to be imported. slimops does not import it
# itself: it imports triton (about 0.2 s, an eighth of `import slimops`) and only
# FlopCounterMode's users need it.
_pending_flops: List[Tuple[Any, Callable[..., int]]] = []


def _register_flops_now(module: ModuleType, op: Any, formula: Callable[..., int]) -> None:
    if op not in module.flop_registry:  # registering twice raises in torch
        module.register_flop_formula(op)(formula)


class _AfterFlopCounterImport(importlib.abc.MetaPathFinder):
    """Registers the pending formulas as soon as torch.utils.flop_counter has been executed
    (then leaves sys.meta_path): the import finds the module as usual, its loader runs it,
    then the formulas are added to its registry."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != FLOP_COUNTER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            for op, formula in _pending_flops:
                _register_flops_now(module, op, formula)
            _pending_flops.clear()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_flops(op: "torch._ops.OpOverloadPacket", formula: Callable[..., int]) -> None:
    """Give ``torch.utils.flop_counter.FlopCounterMode`` the FLOPs of a compiled op (without
    one it counts 0 for the op, so a slimmable model looked free). ``formula`` gets the op's
    arguments with tensors replaced by their shapes and ``out_shape=`` (torch's convention);
    it counts 2 FLOPs per multiply-add at the active width, as torch's conv and mm formulas
    do. Registered at once if the flop counter is imported, else when it is."""
    module = sys.modules.get(FLOP_COUNTER)
    if module is not None:
        _register_flops_now(module, op, formula)
        return
    if not _pending_flops:
        sys.meta_path.insert(0, _AfterFlopCounterImport())
    _pending_flops.append((op, formula))


def conv_flops(grad_or_out_shape: Sequence[int], in_channels_per_group: int,
               kernel_hw: Sequence[int]) -> int:
    """2 x multiply-adds of a convolution (or of either of its gradients, which cost the
    same): every output element takes ``in_channels_per_group * kh * kw`` products."""
    return 2 * math.prod(grad_or_out_shape) * in_channels_per_group * kernel_hw[0] * kernel_hw[1]
