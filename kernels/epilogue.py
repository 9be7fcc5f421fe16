"""Triton kernels of the fused epilogue: its elementwise apply and its backward.

* ``epilogue(z, bias, scale, shift, residual, activation)`` computes
  ``act((z + bias[c]) * scale[c] + shift[c] + residual)`` over an ``[N, C, *]`` tensor. The
  convolutions fuse this into their own output pass; this standalone kernel serves the
  batch norm's normalisation (``scale``/``shift`` = the per-channel affine map a batch norm
  folds to) and any op without a fused epilogue.
* ``epilogue_backward(grad_out, out, scale, activation)`` is ``slimops::epilogue_backward``:
  ``grad_out * act'(out) * scale[c]``, the activation's mask read from the op's output
  (relu: ``out > 0``; relu6: ``0 < out < 6``, as csrc/cpu/common.h ``activation_mask``), so a
  masked-out gradient is exactly zero.

Both kernels walk the tensor as one flat range (``c = (i // HW) % C``): that covers a 2-D
``[N, C]`` input (HW = 1) as well as large planes without wasting lanes, and the
per-channel vectors are gathered (they stay in L1/L2). Every per-channel vector is read
through its stride, so it may be a view of a full-width parameter. Arithmetic is fp32
whatever the storage dtype; the result is stored in the input's dtype.

This module also holds the AOT helpers the other kernel modules share (``compiled``,
``launch_case``, ``meta_tensor``, ``split_tiles``).
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimops.kernels._aot import AotCase
from slimops.kernels._common import (
    ACT_NONE,
    ACT_RELU,
    ACT_RELU6,
    check_device,
    traceable,
)

# Flat elementwise kernels: elements per program and warps. The launchers pick the first
# entry whose BLOCK is at least 1/64 of the tensor (large tensors get the large block).
CONFIGS: List[Dict[str, int]] = [
    {"BLOCK": 256, "num_warps": 2},
    {"BLOCK": 1024, "num_warps": 4},
    {"BLOCK": 2048, "num_warps": 8},
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pick_config(numel: int, configs: List[Dict[str, int]] = CONFIGS) -> Dict[str, int]:
    """The tuning entry for a flat pass over ``numel`` elements: the smallest block that
    still gives each program a useful amount of work (one entry per 64 blocks of it)."""
    for cfg in configs:
        if numel <= cfg["BLOCK"] * 64:
            return cfg
    return configs[-1]


def flat_launch(
    numel: int, configs: List[Dict[str, int]] = CONFIGS
) -> Tuple[Tuple[int], Dict[str, int]]:
    """The grid and the tuning entry (``pick_config``'s) of a flat pass over ``numel``
    elements: one program per ``BLOCK`` of them."""
    cfg = pick_config(numel, configs)
    return (triton.cdiv(numel, cfg["BLOCK"]),), cfg


_COMPILED: Dict[int, Any] = {}


def compiled(kernel: Any) -> Any:
    """``kernel`` as a compilable ``JITFunction``, for the AOT cases.

    Under ``TRITON_INTERPRET=1`` (the tests without a GPU) ``@triton.jit`` returns an
    ``InterpretedFunction``, which ``triton.compile`` cannot take, and a compiled kernel
    cannot call interpreted helpers. So this rebuilds the Python function with a globals
    dict in which every interpreted ``@triton.jit`` helper is replaced by its compiled twin
    (recursively, cached) and wraps it in a ``JITFunction``. Without the interpreter the
    kernel is returned as is.
    """
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    key = id(kernel)
    if key not in _COMPILED:
        fn = kernel.fn
        scope = dict(fn.__globals__)
        for name in fn.__code__.co_names:  # the globals the kernel body refers to
            value = fn.__globals__.get(name)
            if value is not kernel and type(value).__name__ == "InterpretedFunction":
                scope[name] = compiled(value)
        twin = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        twin.__module__ = fn.__module__
        twin.__qualname__ = fn.__qualname__
        # The JIT reads which parameters are tl.constexpr from the annotations (strings under
        # ``from __future__ import annotations``); FunctionType does not carry them over.
        twin.__annotations__ = dict(fn.__annotations__)
        twin.__kwdefaults__ = fn.__kwdefaults__
        _COMPILED[key] = JITFunction(twin)
    return _COMPILED[key]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs a reduction launch should aim for: four waves of the GPU's SMs. 0 off the
    GPU (the interpreter), meaning "at most two tiles per channel": few programs, as each is
    slow to interpret, but more than one, so the tests exercise the cross-tile reduction."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 0


# The programs a reduction aims for on the GPU the AOT cases are built for: an H100's 132
# SMs, four waves (``_target_programs`` on that device).
AOT_TARGET_PROGRAMS = 4 * 132


def split_tiles(total: int, channels: int, block: int, device: Optional[torch.device],
                target: Optional[int] = None) -> Tuple[int, int]:
    """Split a per-channel reduction over ``total`` elements into tiles: returns
    ``(num_tiles, per_tile)``, ``per_tile`` a multiple of ``block``. Enough (tile, channel)
    programs to fill the GPU (``target`` programs; by default ``_target_programs(device)``);
    never a tile shorter than one block."""
    blocks = max(1, triton.cdiv(total, block))
    if target is None:
        target = _target_programs(device)
    tiles = min(blocks, 2) if target == 0 else max(1, min(blocks, target // max(channels, 1)))
    per_tile = triton.cdiv(blocks, tiles) * block
    return triton.cdiv(max(total, 1), per_tile), per_tile


# tl.sum's combine function (a + b). The kernels call ``tl.reduce(x, axis, _sum_combine)``
# instead of ``tl.sum(x, axis)``, and ``tl.full(shape, 0.0, dtype)`` instead of ``tl.zeros``:
# with TRITON_INTERPRET=1 set when triton is imported, ``tl.sum`` and ``tl.zeros`` are
# themselves interpreted functions that no compiled kernel can call (the code generator runs
# them as Python, which patches triton.language for the interpreter), so the AOT check
# (``compiled``) could not build those kernels; a module global like this one it remaps to
# its compiled twin. The interpreter recognises this very function and reduces with numpy.
_sum_combine = tl.standard._sum_combine


@triton.jit
def _flat_block(numel, C, HW, BLOCK: tl.constexpr):
    """This program's flat offsets (int64: activations can exceed 2^31 elements), their mask
    and their channels ``(i // HW) % C``. The one 64-bit division is per program; per
    element the divisions are 32-bit (a 64-bit one is a called subroutine that costs
    registers and stack)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    row0 = start // HW
    local = (start - row0 * HW).to(tl.int32) + tl.arange(0, BLOCK)
    c = ((row0 % C).to(tl.int32) + local // HW) % C
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < numel, c


@triton.jit
def _activate(y, ACT: tl.constexpr):
    # Codes as in csrc/cpu/common.h. Selects on comparisons that are false for NaN, so a NaN
    # stays NaN as in torch.relu / F.relu6 (tl.maximum on the GPU returns the non-NaN
    # operand: relu(NaN) would be 0 and a NaN batch would train on silently). relu6 clamps
    # like F.hardtanh(x, 0, 6): +Inf -> 6, -Inf -> 0.
    if ACT == 1:
        y = tl.where(y <= 0.0, 0.0, y)
    elif ACT == 2:
        y = tl.where(y <= 0.0, 0.0, tl.where(y >= 6.0, 6.0, y))
    return y


@triton.jit
def _add_residual_activate_store(acc, res_ptr, out_ptr, offs, mask, HAS_RES: tl.constexpr,
                                 ACT: tl.constexpr):
    # The fused epilogue's last steps, as the epilogue kernel and the depthwise forward end:
    # + residual (read in its dtype, added in fp32, at the output's offsets), the activation,
    # the store in the output's dtype.
    if HAS_RES:
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = _activate(acc, ACT)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activation_mask(grad, out, ACT: tl.constexpr):
    # A select, not a multiply: a masked-out gradient is exactly zero even if grad is inf/nan,
    # like torch's threshold/hardtanh backward and the CPU kernels (csrc/cpu/common.h
    # activation_mask). For a NaN output relu passes the gradient (threshold_backward zeroes
    # only where out <= 0) and relu6 zeroes it (hardtanh_backward keeps only 0 < out < 6).
    if ACT == 1:
        grad = tl.where(out <= 0.0, 0.0, grad)
    elif ACT == 2:
        grad = tl.where((out > 0.0) & (out < 6.0), grad, 0.0)
    return grad


@triton.jit
def _epilogue_kernel(
    z_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    numel, C, HW, bias_stride, scale_stride, shift_stride,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask, c = _flat_block(numel, C, HW, BLOCK)
    y = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + c * bias_stride, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        y *= tl.load(scale_ptr + c * scale_stride, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        y += tl.load(shift_ptr + c * shift_stride, mask=mask, other=0.0).to(tl.float32)
    _add_residual_activate_store(y, res_ptr, out_ptr, offs, mask, HAS_RES, ACT)


@triton.jit
def _epilogue_backward_kernel(
    grad_ptr, out_ptr, scale_ptr, result_ptr,
    numel, C, HW, scale_stride,
    HAS_SCALE: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, mask, c = _flat_block(numel, C, HW, BLOCK)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _activation_mask(g, o, ACT)
    if HAS_SCALE:
        g *= tl.load(scale_ptr + c * scale_stride, mask=mask, other=0.0).to(tl.float32)
    tl.store(result_ptr + offs, g.to(result_ptr.dtype.element_ty), mask=mask)


def _check_activation(activation: int) -> None:
    if activation not in (ACT_NONE, ACT_RELU, ACT_RELU6):
        raise ValueError(f"slimops.kernels: unknown activation code {activation}")


def _check_vector(v: Optional[Tensor], c: int, name: str) -> None:
    if v is not None and (v.dim() != 1 or v.shape[0] != c):
        raise ValueError(f"slimops.kernels: {name} must be a vector of length {c}, got {tuple(v.shape)}")


def _plane(t: Tensor) -> int:
    # From the shape alone: indexing t (t[0, 0]) would be an op, which a fake CUDA tensor
    # cannot run in a torch built without CUDA (tests/trace_triton_ops.py traces on them).
    return math.prod(t.shape[2:]) if t.shape[0] and t.shape[1] else 1


def _planes_channels(op: str, x: Tensor, other: Optional[Tensor], other_name: str) -> int:
    """The elementwise launchers' shape checks: ``x`` is ``[N, C, *]`` and ``other`` (when
    given) has ``x``'s shape. Returns ``C``."""
    if x.dim() < 2:
        raise ValueError(f"slimops.kernels.{op}: expected [N, C, *], got {tuple(x.shape)}")
    if other is not None and other.shape != x.shape:
        raise ValueError(f"slimops.kernels.{op}: {other_name} shape {tuple(other.shape)} "
                         f"differs from {tuple(x.shape)}")
    return x.shape[1]


def epilogue(
    z: Tensor,
    bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    activation: int,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``act((z + bias[c]) * scale[c] + shift[c] + residual)`` over ``z = [N, C, *]``.

    ``bias``, ``scale``, ``shift``: length-``C`` vectors (any stride, any float dtype: they
    are read and applied in fp32) or None; ``residual``: ``z``'s shape or None;
    ``activation``: 0 none, 1 relu, 2 relu6. Returns a new contiguous tensor of ``z``'s dtype
    (or writes ``out``, contiguous with ``z``'s shape, which may alias ``z``).
    """
    _check_activation(activation)
    check_device(z, bias, scale, shift, residual)
    c = _planes_channels("epilogue", z, residual, "residual")
    for name, v in (("bias", bias), ("scale", scale), ("shift", shift)):
        _check_vector(v, c, name)
    z = z.contiguous()
    if residual is not None:
        residual = residual.contiguous()
    if out is None:
        out = torch.empty_like(z, memory_format=torch.contiguous_format)
    numel = z.numel()
    if numel == 0:
        return out
    grid, args, kwargs = _epilogue_launch(z, bias, scale, shift, residual, out, activation)
    traceable(_epilogue_kernel)[grid](*args, **kwargs)
    return out


def _epilogue_launch(
    z: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
    residual: Optional[Tensor], out: Tensor, activation: int,
) -> Tuple[Tuple[int], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of the apply kernel's launch, ``_epilogue_kernel[grid](*args,
    **kwargs)`` (the launcher's, and the AOT cases', which pass meta tensors of real shapes):
    ``z``, ``residual`` and ``out`` contiguous, ``z.numel() > 0``."""
    grid, cfg = flat_launch(z.numel())
    # Absent vectors: a dummy pointer of the input's dtype keeps the signature stable.
    args = (
        z, z if bias is None else bias, z if scale is None else scale,
        z if shift is None else shift, z if residual is None else residual, out,
        z.numel(), z.shape[1], _plane(z),
        0 if bias is None else bias.stride(0), 0 if scale is None else scale.stride(0),
        0 if shift is None else shift.stride(0),
    )
    kwargs = dict(
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_RES=residual is not None, ACT=activation, BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"],
    )
    return grid, args, kwargs


def epilogue_backward(
    grad_out: Tensor, out: Tensor, scale: Optional[Tensor], activation: int
) -> Tensor:
    """``slimops::epilogue_backward``: ``grad_out * act'(out) * scale[c]`` (``scale``
    optional, read through its stride), a new contiguous tensor of ``grad_out``'s dtype."""
    _check_activation(activation)
    check_device(grad_out, out, scale)
    c = _planes_channels("epilogue_backward", out, grad_out, "grad_out")
    _check_vector(scale, c, "scale")
    g = grad_out.contiguous()
    o = out.contiguous()
    result = torch.empty_like(g, memory_format=torch.contiguous_format)
    numel = g.numel()
    if numel == 0:
        return result
    grid, args, kwargs = _epilogue_backward_launch(g, o, scale, result, activation)
    traceable(_epilogue_backward_kernel)[grid](*args, **kwargs)
    return result


def _epilogue_backward_launch(
    g: Tensor, o: Tensor, scale: Optional[Tensor], result: Tensor, activation: int,
) -> Tuple[Tuple[int], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of the backward kernel's launch (contiguous ``g``, ``o``,
    ``result``; ``g.numel() > 0``)."""
    grid, cfg = flat_launch(g.numel())
    args = (g, o, g if scale is None else scale, result,
            g.numel(), g.shape[1], _plane(g), 0 if scale is None else scale.stride(0))
    kwargs = dict(HAS_SCALE=scale is not None, ACT=activation, BLOCK=cfg["BLOCK"],
                  num_warps=cfg["num_warps"])
    return grid, args, kwargs


def meta_tensor(shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A contiguous meta tensor: what the AOT cases hand the launch builders (a real shape and
    dtype, no memory)."""
    return torch.empty(shape, dtype=dtype, device="meta")


def launch_case(name: str, kernel: Any, launch: Tuple[Any, Tuple[Any, ...], Dict[str, Any]],
                **fields: Any) -> AotCase:
    """The ``AotCase`` of one launch ``kernel[grid](*args, **kwargs)`` as a launch builder
    returns it (``launch = (grid, args, kwargs)``): ``AotCase.from_launch`` with the launch
    options (``num_warps``, ``num_stages``: triton's defaults 4 and 3 when absent) split off.
    ``fields``: ``min_occupancy``, ``meta``."""
    _, args, kwargs = launch
    kw = dict(kwargs)
    warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
    return AotCase.from_launch(name, compiled(kernel), args, kw, warps, stages, **fields)


def with_floors(cases: List[AotCase], floors: Dict[str, int]) -> List[AotCase]:
    """Set each case's ``min_occupancy`` (the blocks per SM tests/kernels/test_aot.py
    requires) from ``floors``, by kernel name. Returns ``cases``."""
    for case in cases:
        case.min_occupancy = floors[case.fn.fn.__name__]
    return cases


# Resident blocks per SM each kernel's AOT cases must keep (a regression floor under the
# JIT-exact figures of docs/GPU_KERNELS.md, at least 6 on both archs).
AOT_MIN_OCCUPANCY = {"_epilogue_kernel": 4, "_epilogue_backward_kernel": 4}

# The tensors the AOT cases are built at (S-MobileNet v2, width 1.0), one per tuning entry
# (``pick_config`` picks by the element count): [N, C, H, W].
AOT_SHAPES: Dict[int, Tuple[int, int, int, int]] = {
    256: (1, 320, 7, 7),  # batch 1, the last bottleneck's output (15680 values)
    1024: (1, 1280, 7, 7),  # batch 1, the last 1x1 conv's output (62720 values)
    2048: (32, 144, 56, 56),  # batch 32, an expand layer's output at 56x56
}


def aot_cases() -> List[AotCase]:
    """The binaries the launchers compile, specialised exactly as triton's JIT specialises
    their launches (``launch_case`` on ``_epilogue_launch`` / ``_epilogue_backward_launch``,
    meta tensors at ``AOT_SHAPES``: one shape per tuning entry): per dtype and entry the
    apply kernel without epilogue and with the full one (bias, scale, shift, residual,
    relu6); the backward without and with scale + relu6. ``meta["call"]`` runs the public
    launcher at the case's shape on CPU tensors (tests/kernels/test_aot.py captures it)."""
    cases: List[AotCase] = []
    for dtype in DTYPES:
        tag = str(dtype).split(".")[-1]
        for cfg in CONFIGS:
            block, warps = cfg["BLOCK"], cfg["num_warps"]
            shape = AOT_SHAPES[block]
            assert pick_config(math.prod(shape)) == cfg, shape
            z, vec = meta_tensor(shape, dtype), meta_tensor((shape[1],), dtype)
            for full in (False, True):
                opt = vec if full else None
                act = ACT_RELU6 if full else ACT_NONE
                meta = dict(shape=shape, dtype=dtype, mode="full" if full else "plain")
                cases.append(launch_case(
                    f"epilogue_{tag}_b{block}_w{warps}_{'full' if full else 'plain'}",
                    _epilogue_kernel,
                    _epilogue_launch(z, opt, opt, opt, z if full else None, z, act),
                    meta=dict(meta, call=functools.partial(
                        _aot_call, epilogue, shape, dtype, full, act))))
                cases.append(launch_case(
                    f"epilogue_backward_{tag}_b{block}_w{warps}_"
                    f"{'scale_relu6' if full else 'plain'}",
                    _epilogue_backward_kernel,
                    _epilogue_backward_launch(z, z, opt, z, act),
                    meta=dict(meta, call=functools.partial(
                        _aot_call, epilogue_backward, shape, dtype, full, act))))
    return with_floors(cases, AOT_MIN_OCCUPANCY)


def _aot_call(op: Any, shape: Tuple[int, ...], dtype: torch.dtype, full: bool,
              act: int) -> None:
    """``op`` (``epilogue`` or ``epilogue_backward``) at an AOT case's shape, CPU tensors."""
    z = torch.empty(shape, dtype=dtype)
    vec = torch.empty(shape[1], dtype=dtype) if full else None
    if op is epilogue:
        epilogue(z, vec, vec, vec, z if full else None, act)
    else:
        epilogue_backward(z, z, vec, act)


__all__ = ["CONFIGS", "aot_cases", "epilogue", "epilogue_backward"]
