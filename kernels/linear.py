"""Triton kernels of the slimmable linear layer and its two backward ops.

The active weight is the prefix ``W[:out_features, :in_features]`` of the full
``[O_full, I_full]`` weight. It is a strided matrix (row stride ``I_full``), so every GEMM
below reads it in place through the full tensor's strides; slicing + ``contiguous()`` would
copy the shared weight on every call, which is what slimops exists to avoid.

All three ops are one tiled ``tl.dot`` GEMM, ``C[M, N] = A[M, K] @ B[K, N] (+ bias[N])``,
with every operand addressed through run-time strides, so transposes are free:

==========================  =====================  ====================  =================
op                          A [M, K]               B [K, N]              C [M, N]
==========================  =====================  ====================  =================
``linear``                  input [B, in]          W[:out, :in]^T        out [B, out]
``linear_backward_input``   grad_out [B, out]      W[:out, :in]          grad_in [B, in]
``linear_backward_weight``  grad_out^T [out, B]    input [B, in]         grad_W[:out, :in]
==========================  =====================  ====================  =================

The grid launches the (M, N) tiles in the grouped (L2-swizzled) order of
``slimops.kernels.conv2d``: groups of ``GROUP_M`` M tiles sweep every N tile before the next
group, so the programs resident at once read a few row panels of A and a run of column
panels of B, each panel shared through L2 by the programs beside it (row-major with M fastest
swept every M tile for one N tile: with many M tiles, as a large batch gives, A's panels were
evicted before the next N tile re-read them). The order rides on the grid's axes (x: the M
tiles of a group, y: N tiles, z: the group; launch order is x fastest), not on a decoded flat
program id: a decoded tile index is a value ptxas keeps live across the K loop, where it
re-reads a program id, and the decoded form cost up to 8 registers and an 8-byte spill
(fp32 IEEE, 64 x 64 tile with bias, sm_80). S-MobileNet v2's classifier GEMMs (at most 80
tiles) fit in one wave of an H100 either way.

Accumulation is fp32 for every dtype; C is stored in its tensor's dtype. fp32 operands use
TF32 tensor cores only when ``torch.backends.cuda.matmul.allow_tf32`` says so (off by
default, as for ``F.linear``), through the ``ALLOW_TF32`` constexpr.
"""

from __future__ import annotations

import functools

from typing import Any, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimops.kernels._aot import AotCase
from slimops.kernels._common import check_device, interpreting, traceable
from slimops.kernels.epilogue import DTYPES, launch_case, meta_tensor

# GEMM tiles. The launchers pick one per call (_pick): the small tile for narrow widths
# and small batches (classifier heads: B x 1000 with B small), where a big tile would leave
# most SMs idle; the larger ones when both M and N are large. BLOCK_K is 16 on the larger
# tiles: with 32, fp32 operands on the IEEE (FMA) dot path spill registers.
CONFIGS: List[Dict[str, int]] = [
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},
]


# Grouped launch order (module docstring): GROUP_M M tiles sweep every N tile before the next
# group, as conv2d's kernels do.
GROUP_M = 8


def _pick(m: int, n: int) -> Dict[str, int]:
    """The tuning entry for an ``M x N`` output (the interpreter always gets the smallest:
    its cost is per program op, and the tests then exercise several tiles)."""
    return CONFIGS[0] if interpreting() else _pick_gpu(m, n)


def _pick_gpu(m: int, n: int) -> Dict[str, int]:
    """The GPU's tuning entry for an ``M x N`` output."""
    if m <= 32:
        return CONFIGS[0]
    if m >= 128 and n >= 128 and triton.cdiv(m, 128) * triton.cdiv(n, 128) >= 64:
        return CONFIGS[2]
    return CONFIGS[1]


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K, m_group,
    sam, sak, sbk, sbn, scm, scn, bias_stride,
    HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The grouped order on the grid's axes (module docstring): x, m_group M tiles of M group
    # pid_z; y, the N tile. A program past the last M tile (the last group's) computes
    # nothing: its K loop is empty and its store masked.
    pid_m = tl.program_id(2) * m_group + tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    # Row/column offsets in int64 (a large batch times a wide row can pass 2^31); the K
    # offset is added per iteration.
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * sam
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * sbn
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)  # not tl.zeros: see conv2d.py
    for k0 in range(0, tl.where(pid_m * BLOCK_M < M, K, 0), BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        a = tl.load(a_rows + kk[None, :] * sak, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_cols + kk[:, None] * sbk, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if ALLOW_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * bias_stride, mask=nmask, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + rm.to(tl.int64)[:, None] * scm + rn.to(tl.int64)[None, :] * scn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _allow_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32)


def _gemm(
    a: Tensor, a_strides: Tuple[int, int], b: Tensor, b_strides: Tuple[int, int],
    c: Tensor, c_strides: Tuple[int, int], m: int, n: int, k: int, bias: Optional[Tensor],
) -> None:
    """``c[:m, :n] = a @ b (+ bias)`` with each operand given as (pointer, its (row, col)
    strides); ``k == 0`` gives the bias (or zeros), like ``F.linear``."""
    if m == 0 or n == 0:
        return
    grid, args, kwargs = _gemm_launch(a, a_strides, b, b_strides, c, c_strides, m, n, k, bias,
                                      _pick(m, n))
    traceable(_gemm_kernel)[grid](*args, **kwargs)


def _gemm_launch(
    a: Tensor, a_strides: Tuple[int, int], b: Tensor, b_strides: Tuple[int, int],
    c: Tensor, c_strides: Tuple[int, int], m: int, n: int, k: int, bias: Optional[Tensor],
    cfg: Dict[str, int],
) -> Tuple[Tuple[int, int, int], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of ``_gemm``'s launch with tuning entry ``cfg`` (the
    launcher's, and the AOT cases', which pass meta tensors of real shapes)."""
    num_m = triton.cdiv(m, cfg["BLOCK_M"])
    m_group = min(GROUP_M, num_m)
    # x: m_group M tiles (fastest in launch order), y: every N tile, z: the M group
    grid = (m_group, triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(num_m, m_group))
    args = (a, b, c if bias is None else bias, c,
            m, n, k, m_group, *a_strides, *b_strides, *c_strides,
            0 if bias is None else bias.stride(0))
    kwargs = dict(
        HAS_BIAS=bias is not None, ALLOW_TF32=_allow_tf32(a.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return grid, args, kwargs


def _check(weight: Tensor, *tensors: Tensor) -> None:
    check_device(weight, *tensors)
    if weight.dim() != 2:
        raise ValueError(f"slimops.kernels.linear: weight must be 2-D, got {tuple(weight.shape)}")
    for t in tensors:
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"slimops.kernels.linear: dtype mismatch ({t.dtype} vs the weight's "
                             f"{weight.dtype})")
    if weight.dtype not in DTYPES:
        raise TypeError(f"slimops.kernels.linear: unsupported dtype {weight.dtype}")


def _rows(x: Tensor) -> Tensor:
    # Leading dims flattened: a view when possible, else a copy of the activation (never of
    # the weight). A 2-D input is used as is, with its own strides.
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _rows_times_weight(
    a: Tensor, weight: Tensor, w_strides: Tuple[int, int], n: int, k: int,
    bias: Optional[Tensor],
) -> Tensor:
    """``a [*, k] @ B (+ bias)`` with ``B [k, n]`` the weight's prefix read in place through
    ``w_strides`` (its (row, col) strides as B's: swapped for ``W^T``). Returns a new
    ``[*, n]`` tensor of ``a``'s dtype; ``a``'s leading dims are flattened (``_rows``)."""
    x = _rows(a)
    m = x.shape[0]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    _gemm(x, (x.stride(0), x.stride(1)), weight, w_strides, out, (out.stride(0), out.stride(1)),
          m, n, k, bias)
    return out.view(*a.shape[:-1], n)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    """``slimops::linear``: ``input @ W[:out_features, :in_features]^T + b[:out_features]``
    with ``in_features = input.shape[-1]``.

    ``input``: ``[*, in_features]`` (leading dims flattened); ``weight``: the full
    ``[O_full, I_full]`` weight, read in place; ``bias``: the full ``[O_full]`` bias or None.
    Returns a contiguous ``[*, out_features]`` tensor of the input's dtype.
    """
    _check(weight, input, bias)
    if input.dim() < 1:
        raise ValueError("slimops.kernels.linear: input must have at least 1 dim")
    in_features = input.shape[-1]
    if not 1 <= in_features <= weight.shape[1]:
        raise ValueError(f"slimops.kernels.linear: input has {in_features} features; the weight "
                         f"takes 1 to {weight.shape[1]}")
    if not 1 <= out_features <= weight.shape[0]:
        raise ValueError(f"slimops.kernels.linear: out_features={out_features} must be in "
                         f"[1, {weight.shape[0]}]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"slimops.kernels.linear: bias must be [{weight.shape[0]}], "
                         f"got {tuple(bias.shape)}")
    # B[k, n] = W[n, k]: the weight's strides swapped.
    return _rows_times_weight(input, weight, (weight.stride(1), weight.stride(0)),
                              out_features, in_features, bias)


def linear_backward_input(grad_out: Tensor, weight: Tensor, in_features: int) -> Tensor:
    """``slimops::linear_backward_input``: ``grad_out @ W[:out_features, :in_features]``,
    ``out_features = grad_out.shape[-1]``; returns ``[*, in_features]`` in grad_out's dtype."""
    _check(weight, grad_out)
    out_features = grad_out.shape[-1]
    if not 1 <= out_features <= weight.shape[0] or not 1 <= in_features <= weight.shape[1]:
        raise ValueError(f"slimops.kernels.linear_backward_input: widths ({out_features}, "
                         f"{in_features}) exceed the weight's {tuple(weight.shape)}")
    # B[k, n] = W[k, n]: the weight as it is.
    return _rows_times_weight(grad_out, weight, (weight.stride(0), weight.stride(1)),
                              in_features, out_features, None)


def linear_backward_weight(grad_out: Tensor, input: Tensor, weight: Tensor) -> Tensor:
    """``slimops::linear_backward_weight``: ``grad_out^T @ input`` written into the
    ``[:out_features, :in_features]`` prefix of a zero tensor of the full weight's shape and
    dtype (so autograd accumulates it as is); the rest stays zero."""
    _check(weight, grad_out, input)
    out_features, in_features = grad_out.shape[-1], input.shape[-1]
    if not 1 <= out_features <= weight.shape[0] or not 1 <= in_features <= weight.shape[1]:
        raise ValueError(f"slimops.kernels.linear_backward_weight: widths ({out_features}, "
                         f"{in_features}) exceed the weight's {tuple(weight.shape)}")
    g, x = _rows(grad_out), _rows(input)
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"slimops.kernels.linear_backward_weight: grad_out has {g.shape[0]} rows, "
                         f"input {x.shape[0]}")
    grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    # A[m, k] = grad_out[k, m]: grad_out's strides swapped; C is the prefix of grad_weight.
    _gemm(g, (g.stride(1), g.stride(0)), x, (x.stride(0), x.stride(1)),
          grad_weight, (grad_weight.stride(0), grad_weight.stride(1)), out_features,
          in_features, g.shape[0], None)
    return grad_weight


# The classifier of S-MobileNet v2 (width 1.0): 1280 features -> 1000 classes.
AOT_FEATURES = (1280, 1000)
# The AOT cases: (op, batch, bias). The GPU pick (``_pick_gpu``) gives each tuning entry at
# least one: the forward at batch 1 and 32 (entry 0), 256 (entry 1), and 1024 (entry 2, the
# only forward with bias that reaches it); the input gradient at batch 32 (0) and 256 (1);
# the weight gradient at batch 256 (its output is the 1000 x 1280 weight: entry 2).
AOT_CALLS = [("forward", 1, True), ("forward", 256, True), ("forward", 1024, True),
             ("backward_input", 32, False), ("backward_input", 256, False),
             ("backward_weight", 256, False)]


def _aot_operands(op: str, batch: int, dtype: torch.dtype, device: str) -> Tuple[Tensor, ...]:
    """``(x, weight, bias)`` of an AOT call: ``x`` is the op's activation operand (input,
    or grad_out for the input gradient)."""
    i, o = AOT_FEATURES
    x = torch.empty((batch, o if op == "backward_input" else i), dtype=dtype, device=device)
    return x, torch.empty((o, i), dtype=dtype, device=device), torch.empty(o, dtype=dtype,
                                                                           device=device)


def _aot_launch(op: str, batch: int, bias: bool, dtype: torch.dtype) -> Tuple[Any, ...]:
    """The launch (``_gemm_launch``) of an AOT call, on meta tensors, with the GPU's pick:
    the operands exactly as the launchers pass them."""
    i, o = AOT_FEATURES
    x, w, b = _aot_operands(op, batch, dtype, "meta")
    if op == "forward":
        out = meta_tensor((batch, o), dtype)
        mnk, ops = (batch, o, i), (x, x.stride(), w, (w.stride(1), w.stride(0)), out, out.stride())
    elif op == "backward_input":
        out = meta_tensor((batch, i), dtype)
        mnk, ops = (batch, i, o), (x, x.stride(), w, w.stride(), out, out.stride())
    else:
        g = meta_tensor((batch, o), dtype)
        mnk, ops = (o, i, batch), (g, (g.stride(1), g.stride(0)), x, x.stride(), w, w.stride())
    return _gemm_launch(*ops, *mnk, b if bias else None, _pick_gpu(mnk[0], mnk[1]))


def _aot_call(op: str, batch: int, bias: bool, dtype: torch.dtype) -> None:
    """The public launcher of an AOT call on CPU tensors."""
    x, w, b = _aot_operands(op, batch, dtype, "cpu")
    if op == "forward":
        linear(x, w, b if bias else None, w.shape[0])
    elif op == "backward_input":
        linear_backward_input(x, w, w.shape[1])
    else:
        linear_backward_weight(torch.empty((batch, w.shape[0]), dtype=dtype), x, w)


def aot_cases() -> List[AotCase]:
    """The binaries the launchers compile at ``AOT_CALLS``, specialised exactly as triton's
    JIT specialises their launches (``launch_case`` on ``_gemm_launch``'s argument list,
    meta tensors of the real shapes): per dtype (fp32 in both dot precisions, IEEE and
    TF32) the forward with bias at batch 1, 256, 1024 and both gradients, every tuning entry
    covered (with and without bias). ``meta["call"]`` runs the launcher on CPU tensors."""
    cases: List[AotCase] = []
    for dtype in DTYPES:
        tag = str(dtype).split(".")[-1]
        for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            for op, batch, bias in AOT_CALLS:
                grid, args, kwargs = _aot_launch(op, batch, bias, dtype)
                kwargs = dict(kwargs, ALLOW_TF32=tf32)
                cfg = CONFIGS.index(next(c for c in CONFIGS if all(
                    c[k] == kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))))
                c = CONFIGS[cfg]
                name = (f"linear_gemm_{tag}{'_tf32' if tf32 else ''}_m{c['BLOCK_M']}"
                        f"n{c['BLOCK_N']}k{c['BLOCK_K']}_w{c['num_warps']}s{c['num_stages']}"
                        f"{'_bias' if bias else ''}")
                cases.append(launch_case(
                    name, _gemm_kernel, (grid, args, kwargs),
                    meta=dict(op=op, batch=batch, dtype=dtype, tf32=tf32, config=cfg,
                              call=functools.partial(_aot_call, op, batch, bias, dtype))))
    return cases


__all__ = ["CONFIGS", "aot_cases", "linear", "linear_backward_input", "linear_backward_weight"]
