"""Triton kernels of switchable batch norm: one width's BN + residual + activation, and its
backward (``slimops::batch_norm_act`` / ``slimops::batch_norm_act_backward``).

The input is viewed as a contiguous ``[N, C, HW]`` tensor (HW = 1 for a 2-D input).

Forward, training mode:

1. ``_bn_stats_kernel``, grid ``(T, C)``: program (t, c) reduces a fixed range of the
   ``N * HW`` values of channel c into its *moments* ``(count, mean, M2)`` (``M2`` the sum of
   squared deviations from the range's own mean), written to row t of an fp32
   ``[3, T, C]`` buffer (planes: count, mean, M2). A convolution with a statistics epilogue
   writes the same format for its output tiles (``store_tile_moments``).
2. The merge tree: ``_bn_merge_kernel`` merges groups of up to ``MERGE_ROWS`` (64) rows into
   one with Chan et al.'s combination, launched until at most ``MERGE_ROWS`` rows remain
   (``merge_plan``: ``log_64(T)`` launches, a fixed grouping, so the statistics are
   bit-identical for identical inputs; no atomics anywhere).
3. ``_bn_finalize_kernel``, one program per block of channels: merges the last (at most
   ``MERGE_ROWS``) rows into the batch mean and biased variance ``M2 / count`` and folds the
   normalisation into ``alpha = weight * invstd``, ``beta = bias - mean * alpha``.
4. The epilogue kernel (``slimops.kernels.epilogue``): ``act(x * alpha[c] + beta[c] + residual)``.

Eval mode skips 1-2 and reads the running statistics in 3.

Numerics of the statistics: one algorithm on every path (the unfused op and the conv
epilogues alike), as the C++ kernels' Welford: no ``E[x^2] - E[x]^2`` (which cancels
catastrophically when ``|mean| >> std``). A tile's moments are taken around the tile's own
mean (two passes over values held in registers), and moments are merged with

    n = n_a + n_b,  mean = (n_a mean_a + n_b mean_b) / n,
    M2 = M2_a + M2_b + n_a (mean_a - mean)^2 + n_b (mean_b - mean)^2

(Chan, Golub, LeVeque 1979; the two deviation terms equal its ``delta^2 n_a n_b / n``),
applied to up to 64 rows at once as a reduction over the rows. Every term is a sum of
non-negative numbers, so nothing cancels; the error in ``mean`` enters ``M2`` only to
second order. Counts are fp32 (exact to 2^24 per merged row; beyond that their relative
error is 6e-8, which moves the merge weights, not the variance's accuracy), and the
variance divides by the exact ``count`` from the launcher.

Backward: ``g = grad_out * act'(out)`` (the mask read from the output, as
``epilogue_backward``); two-stage per-channel sums ``sum(g)`` and ``sum(g * (x - mean))``
(``_bn_backward_stats_kernel`` + ``_bn_backward_finalize_kernel``), then
``grad_input = k_g * g + k_x * (x - mean) + k_0`` with, as in csrc/cpu/batch_norm_act.cpp,
``k_g = weight * invstd`` and, in training only (the batch statistics depend on the input),
``k_x = -k_g * invstd^2 * sum(g (x - mean)) / count``, ``k_0 = -k_g * sum(g) / count``.
``grad_weight = sum(g (x - mean)) * invstd``, ``grad_bias = sum(g)``, both of length C.

Dtypes: fp32 / fp16 / bf16 storage, fp32 arithmetic and statistics. ``out``,
``grad_input``, ``grad_weight`` and ``grad_bias`` have the input's dtype; ``mean``/``var``
are fp32 for every input dtype (``slimops.reference.stats_dtype``), from
``batch_norm_act`` (the op launcher, training and eval) as from
``batch_norm_act_from_partials`` (the fused conv + BN ops): that is what the CPU op
(fp32/fp64 inputs), the CUDA C++ kernel and the op's registered fake return too, so the
kernels can serve as the op's CUDA implementation under torch.compile, and the statistics
saved for the backward are not rounded to fp16/bf16 (no overflow past 65504, no ``1/std``
from a rounded variance). ``batch_norm_act_backward`` reads ``mean``/``var`` of either
dtype (fp32, or the input's).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimops.kernels._aot import AotCase
from slimops.kernels._common import (
    ACT_NONE,
    ACT_RELU6,
    check_device,
    check_int32,
    interpreting,
    traceable,
)
from slimops.kernels.epilogue import (
    DTYPES,
    _activation_mask,
    _check_activation,
    _check_vector,
    _sum_combine,
    _epilogue_kernel,
    _epilogue_launch,
    _flat_block,
    epilogue,
    launch_case,
    meta_tensor,
    with_floors,
    flat_launch,
    _sm_count,
    pick_config,
    split_tiles,
)
from slimops.reference import stats_dtype

# Stage-1 reductions and the elementwise backward: values per loop step / per program.
CONFIGS: List[Dict[str, int]] = [
    {"BLOCK": 128, "num_warps": 4},
    {"BLOCK": 512, "num_warps": 4},
    {"BLOCK": 1024, "num_warps": 8},
]

# The backward's finalize: [FINAL_BLOCK_T, FINAL_BLOCK_C] partials per loop step (its
# partial rows are reduction_split's tiles: at most MERGE_ROWS, whatever the batch).
FINAL_BLOCK_T = 8
FINAL_BLOCK_C = 64
FINAL_WARPS = 2

# The statistics' merge tree: rows of moments one program merges (the tree's fan-in; one
# [MERGE_ROWS, MERGE_BLOCK_C] load per plane, no loop), channels per program, warps.
MERGE_ROWS = 64
MERGE_BLOCK_C = 32
MERGE_WARPS = 4

# The old finalize (before the tree) walked every partial row serially, FINAL_BLOCK_T rows
# per loop step; kept as a constant for serial_finalize_iterations (the before figure).
_SERIAL_ROWS_PER_STEP = 8

# The running statistics' update: channels per program, warps (O(C) work, one wave).
RUNNING_STATS_BLOCK = 1024
RUNNING_STATS_WARPS = 4


# Resident blocks per SM of the two reductions' binaries (``_bn_stats_kernel``,
# ``_bn_backward_stats_kernel``) per CONFIGS entry (BLOCK, num_warps): the AOT figures on
# sm_80 and sm_90 (docs/GPU_KERNELS.md). They take at most 32 registers, so the 2048 threads
# of an SM decide: 16 blocks of 4 warps, 8 of 8. tests/kernels/test_aot.py holds every
# compiled case of the two kernels to exactly this figure.
REDUCE_BLOCKS_PER_SM: Dict[Tuple[int, int], int] = {(128, 4): 16, (512, 4): 16, (1024, 8): 8}

# The SMs of the GPU the AOT cases split the reductions for: an H100 SXM's 132 (an A100 has
# 108), as ``epilogue.AOT_TARGET_PROGRAMS`` (4 x 132) counts them.
AOT_SMS = 132


def _device_sms(device: Optional[torch.device]) -> int:
    """The SM count of ``device``'s GPU (``torch.cuda.get_device_properties``); 0 off the GPU
    (the interpreter)."""
    if device is not None and device.type == "cuda":
        return _sm_count(device.index if device.index is not None
                         else torch.cuda.current_device())
    return 0


def reduction_split(count: int, channels: int, cfg: Dict[str, int],
                    sms: int) -> Tuple[int, int]:
    """``(num_tiles, per_tile)`` of a per-channel reduction over ``count`` values
    (``_bn_stats_kernel``, ``_bn_backward_stats_kernel``: grid ``(num_tiles, channels)``,
    each program looping over ``per_tile / BLOCK`` blocks) on a GPU of ``sms`` SMs.

    Enough programs for every SM to hold as many as the compiled binary allows
    (``sms * REDUCE_BLOCKS_PER_SM``: one full wave of resident blocks), but at most
    ``MERGE_ROWS`` tiles per channel, so the forward's finalize merges the rows in one load
    with no merge launch and the backward's finalize sums at most 64 rows; never a tile
    shorter than one block (``split_tiles``). A function of the shape, the tuning entry and
    the SM count only: the same grid, and so the same statistics bit for bit, for the same
    shape and device. ``sms`` = 0 (the interpreter): at most two tiles per channel."""
    if sms <= 0:
        return split_tiles(count, channels, cfg["BLOCK"], None, 0)
    resident = sms * REDUCE_BLOCKS_PER_SM[(cfg["BLOCK"], cfg["num_warps"])]
    return split_tiles(count, channels, cfg["BLOCK"], None,
                       min(resident, MERGE_ROWS * max(channels, 1)))


def _reduce_config(count: int) -> Dict[str, int]:
    # Under the interpreter the smallest block, so that the small test tensors still split
    # into several tiles.
    return CONFIGS[0] if interpreting() else _reduce_config_gpu(count)


def _reduce_config_gpu(count: int) -> Dict[str, int]:
    """The GPU's tuning entry of a per-channel reduction over ``count`` values."""
    return pick_config(count, CONFIGS)


def merge_plan(num_rows: int) -> List[int]:
    """The rows of moments entering each launch of the statistics' reduction, the finalize
    last: ``[num_rows, cdiv(num_rows, 64), ..., r]`` with ``r <= MERGE_ROWS``; every entry but
    the last is a ``_bn_merge_kernel`` launch. One program reads at most ``MERGE_ROWS`` rows
    per launch, whatever the batch: ``len(plan) = 1 + ceil(log_64(num_rows))`` launches in a
    dependent chain instead of one program walking all ``num_rows``."""
    rows = max(int(num_rows), 0)
    plan = [rows]
    while rows > MERGE_ROWS:
        rows = triton.cdiv(rows, MERGE_ROWS)
        plan.append(rows)
    return plan


def finalize_rows_per_program(num_rows: int) -> int:
    """The most rows of moments any one program of the merge tree or the finalize reads (in
    one vectorised load: one loop iteration): ``min(num_rows, MERGE_ROWS)``."""
    return min(max(int(num_rows), 0), MERGE_ROWS)


def serial_finalize_iterations(num_rows: int) -> int:
    """Loop iterations of one program of the previous finalize, which walked all
    ``num_rows`` partial rows ``8`` at a time (``cdiv(num_rows, 8)``): the before figure
    for ``finalize_rows_per_program``."""
    return triton.cdiv(max(int(num_rows), 0), _SERIAL_ROWS_PER_STEP)


@triton.jit
def _chan_merge_rows(n, mean, m2):
    """Chan et al.'s merge of the rows of ``[R, B]`` moment tiles (count, mean, M2; rows
    with count 0 are empty and contribute nothing) into ``[B]`` moments. One reduction per
    term over the rows: a fixed tree, so the result depends only on the inputs."""
    n_tot = tl.reduce(n, 0, _sum_combine)
    # An all-empty column keeps count 0, mean 0, M2 0 (no division by zero).
    mean_tot = tl.reduce(n * mean, 0, _sum_combine) / tl.maximum(n_tot, 1.0)
    d = tl.where(n > 0.0, mean - mean_tot[None, :], 0.0)
    m2_tot = tl.reduce(m2 + n * d * d, 0, _sum_combine)
    return n_tot, mean_tot, m2_tot


@triton.jit
def store_tile_moments(moments_ptr, row, num_rows, C, cols, col_mask, z, row_valid):
    """Store the moments of a tile's values into row ``row`` of the fp32 moments buffer
    ``[3, num_rows, C]`` (planes: count, mean, M2), one column per channel.

    ``z``: ``[R, B]`` values (any float dtype; fp32 arithmetic), reduced over axis 0;
    ``row_valid``: ``[R]``, which rows are values (the same for every column: a tile's
    valid rows are pixels, its columns channels); ``cols``/``col_mask``: the ``[B]``
    channels and which exist (only those are stored). A tile with no valid row stores
    count 0 (an empty tile; the merge skips it). The convolutions' ``STATS`` epilogues call
    this with their output tile as stored (rounded to the output dtype), so batch norm
    normalises with the moments of the tensor it reads.
    """
    rv = row_valid[:, None]
    zf = tl.where(rv, z.to(tl.float32), 0.0)
    # The count is per tile (a scalar): one reduction of the row mask, not of a 2-D mask
    # (registers: the conv forward's 64 x 64 fp32 tile sits near the 255 limit on sm_80).
    n = tl.reduce(row_valid.to(tl.float32), 0, _sum_combine)
    mean = tl.reduce(zf, 0, _sum_combine) / tl.maximum(n, 1.0)
    # Second pass over the registers: deviations from the tile's own mean (no cancellation).
    d = tl.where(rv, zf - mean[None, :], 0.0)
    m2 = tl.reduce(d * d, 0, _sum_combine)
    # tl.cast, not .to(): the JIT passes an int argument equal to 1 as a Python constant.
    plane = tl.cast(num_rows, tl.int64) * C
    offs = row.to(tl.int64) * C + cols
    tl.store(moments_ptr + offs, tl.full(mean.shape, 0.0, tl.float32) + n, mask=col_mask)
    tl.store(moments_ptr + plane + offs, mean, mask=col_mask)
    tl.store(moments_ptr + 2 * plane + offs, m2, mask=col_mask)


@triton.jit
def _load_moment_rows(src_ptr, first, rows, C, cs, cm, ROWS: tl.constexpr):
    """Rows ``[first, first + ROWS)`` (those ``< rows``) of the ``[3, rows, C]`` moments at
    channels ``cs``: three ``[ROWS, B]`` tiles, absent rows as empty moments."""
    r = first + tl.arange(0, ROWS)
    offs = r.to(tl.int64)[:, None] * C + cs[None, :]
    m = (r < rows)[:, None] & cm[None, :]
    # tl.cast, not .to(): the JIT passes an int argument equal to 1 as a Python constant.
    plane = tl.cast(rows, tl.int64) * C
    n = tl.load(src_ptr + offs, mask=m, other=0.0)
    mean = tl.load(src_ptr + plane + offs, mask=m, other=0.0)
    m2 = tl.load(src_ptr + 2 * plane + offs, mask=m, other=0.0)
    return n, mean, m2


@triton.jit
def _bn_merge_kernel(src_ptr, dst_ptr, C, rows, out_rows,
                     ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (g, cb): rows [g * ROWS, (g + 1) * ROWS) of src -> row g of dst, one block of
    # channels. dst is [3, out_rows, C], out_rows = cdiv(rows, ROWS).
    g = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    n, mean, m2 = _load_moment_rows(src_ptr, g * ROWS, rows, C, cs, cm, ROWS)
    n_t, mean_t, m2_t = _chan_merge_rows(n, mean, m2)
    # tl.cast, not .to(): the JIT passes an int argument equal to 1 as a Python constant.
    plane = tl.cast(out_rows, tl.int64) * C
    offs = g.to(tl.int64) * C + cs
    tl.store(dst_ptr + offs, n_t, mask=cm)
    tl.store(dst_ptr + plane + offs, mean_t, mask=cm)
    tl.store(dst_ptr + 2 * plane + offs, m2_t, mask=cm)


@triton.jit
def _bn_stats_kernel(
    x_ptr, moments_ptr, C, HW, count, per_tile, num_tiles,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    c = tl.program_id(1)
    lo = t * per_tile
    hi = tl.minimum(lo + per_tile, count)
    # The range's moments, one BLOCK chunk at a time: the chunk's own (count, mean, M2) from
    # two passes over its registers, merged into the running ones with Chan's pairwise
    # formula (the merge tree's, for two operands).
    n_acc = 0.0
    mean_acc = 0.0
    m2_acc = 0.0
    for start in range(lo, hi, BLOCK):
        j = start + tl.arange(0, BLOCK)
        m = j < hi
        nb = (j // HW).to(tl.int64)
        v = tl.load(x_ptr + (nb * C + c) * HW + j % HW, mask=m, other=0.0).to(tl.float32)
        cnt = tl.reduce(m.to(tl.float32), 0, _sum_combine)  # >= 1: start < hi
        mu = tl.reduce(v, 0, _sum_combine) / cnt
        d = tl.where(m, v - mu, 0.0)
        n_new = n_acc + cnt
        delta = mu - mean_acc
        mean_acc = mean_acc + delta * (cnt / n_new)
        m2_acc = m2_acc + tl.reduce(d * d, 0, _sum_combine) + delta * delta * (n_acc * cnt / n_new)
        n_acc = n_new
    # tl.cast, not .to(): the JIT passes an int argument equal to 1 as a Python constant.
    plane = tl.cast(num_tiles, tl.int64) * C
    offs = t.to(tl.int64) * C + c
    tl.store(moments_ptr + offs, n_acc)
    tl.store(moments_ptr + plane + offs, mean_acc)
    tl.store(moments_ptr + 2 * plane + offs, m2_acc)


@triton.jit
def _bn_finalize_kernel(
    moments_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr,
    mean_ptr, var_ptr, alpha_ptr, beta_ptr,
    C, num_rows, inv_count, eps, rm_stride, rv_stride, w_stride, b_stride,
    TRAINING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    if TRAINING:
        # The merge tree's last level: at most ROWS rows (merge_plan), one load.
        n, mu, m2 = _load_moment_rows(moments_ptr, 0, num_rows, C, cs, cm, ROWS)
        _n, mean, m2_t = _chan_merge_rows(n, mu, m2)
        # Biased variance over the exact count (1 / count rounded once, in the launcher).
        var = m2_t * inv_count
    else:
        mean = tl.load(rm_ptr + cs * rm_stride, mask=cm, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + cs * rv_stride, mask=cm, other=1.0).to(tl.float32)
    alpha = 1.0 / tl.sqrt_rn(var + eps)
    if HAS_W:
        alpha *= tl.load(w_ptr + cs * w_stride, mask=cm, other=1.0).to(tl.float32)
    beta = -mean * alpha
    if HAS_B:
        beta += tl.load(b_ptr + cs * b_stride, mask=cm, other=0.0).to(tl.float32)
    tl.store(mean_ptr + cs, mean.to(mean_ptr.dtype.element_ty), mask=cm)
    tl.store(var_ptr + cs, var.to(var_ptr.dtype.element_ty), mask=cm)
    tl.store(alpha_ptr + cs, alpha, mask=cm)
    tl.store(beta_ptr + cs, beta, mask=cm)


@triton.jit
def _bn_backward_stats_kernel(
    go_ptr, out_ptr, x_ptr, mean_ptr, psg_ptr, psgx_ptr,
    C, HW, count, per_tile, mean_stride,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    c = tl.program_id(1)
    mu = tl.load(mean_ptr + c * mean_stride).to(tl.float32)
    lo = t * per_tile
    hi = tl.minimum(lo + per_tile, count)
    acc_g = tl.full([BLOCK], 0.0, tl.float32)
    acc_gx = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(lo, hi, BLOCK):
        j = start + tl.arange(0, BLOCK)
        m = j < hi
        offs = ((j // HW).to(tl.int64) * C + c) * HW + j % HW
        g = tl.load(go_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if ACT != 0:
            g = _activation_mask(g, tl.load(out_ptr + offs, mask=m, other=0.0).to(tl.float32), ACT)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        acc_g += g
        acc_gx += g * tl.where(m, x - mu, 0.0)
    tl.store(psg_ptr + t * C + c, tl.reduce(acc_g, 0, _sum_combine))
    tl.store(psgx_ptr + t * C + c, tl.reduce(acc_gx, 0, _sum_combine))


@triton.jit
def _bn_backward_finalize_kernel(
    psg_ptr, psgx_ptr, w_ptr, var_ptr, gw_ptr, gb_ptr, kg_ptr, kx_ptr, k0_ptr,
    C, num_tiles, inv_count, eps, w_stride, var_stride,
    TRAINING: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    rows = tl.arange(0, BLOCK_T)
    acc_g = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
    acc_gx = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        t = t0 + rows
        offs = t[:, None] * C + cs[None, :]
        m = (t < num_tiles)[:, None] & cm[None, :]
        acc_g += tl.load(psg_ptr + offs, mask=m, other=0.0)
        acc_gx += tl.load(psgx_ptr + offs, mask=m, other=0.0)
    sg = tl.reduce(acc_g, 0, _sum_combine)
    sgx = tl.reduce(acc_gx, 0, _sum_combine)
    var = tl.load(var_ptr + cs * var_stride, mask=cm, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt_rn(var + eps)
    kg = invstd
    if HAS_W:
        kg *= tl.load(w_ptr + cs * w_stride, mask=cm, other=1.0).to(tl.float32)
    tl.store(gw_ptr + cs, (sgx * invstd).to(gw_ptr.dtype.element_ty), mask=cm)
    tl.store(gb_ptr + cs, sg.to(gb_ptr.dtype.element_ty), mask=cm)
    tl.store(kg_ptr + cs, kg, mask=cm)
    if TRAINING:
        tl.store(kx_ptr + cs, -kg * invstd * invstd * sgx * inv_count, mask=cm)
        tl.store(k0_ptr + cs, -kg * sg * inv_count, mask=cm)


@triton.jit
def _bn_backward_apply_kernel(
    go_ptr, out_ptr, x_ptr, mean_ptr, kg_ptr, kx_ptr, k0_ptr, gi_ptr,
    numel, C, HW, mean_stride,
    ACT: tl.constexpr, TRAINING: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, m, c = _flat_block(numel, C, HW, BLOCK)
    g = tl.load(go_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if ACT != 0:
        g = _activation_mask(g, tl.load(out_ptr + offs, mask=m, other=0.0).to(tl.float32), ACT)
    gi = g * tl.load(kg_ptr + c, mask=m, other=0.0)
    if TRAINING:
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + c * mean_stride, mask=m, other=0.0).to(tl.float32)
        gi += tl.load(kx_ptr + c, mask=m, other=0.0) * (x - mu) + tl.load(k0_ptr + c, mask=m,
                                                                            other=0.0)
    tl.store(gi_ptr + offs, gi.to(gi_ptr.dtype.element_ty), mask=m)


@triton.jit
def _running_stats_kernel(
    rm_ptr, rv_ptr, mean_ptr, var_ptr, C, momentum, unbias, s_rm, s_rv, s_mean, s_var,
    BLOCK: tl.constexpr,
):
    # running = momentum * batch + (1 - momentum) * running, the variance unbiased; fp32
    # arithmetic whatever the buffers' and the statistics' dtypes, one rounding to each
    # buffer's own dtype (the CPU op's formula, csrc/cpu/batch_norm_act.cpp).
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cs < C
    rm = tl.load(rm_ptr + cs * s_rm, mask=m).to(tl.float32)
    rv = tl.load(rv_ptr + cs * s_rv, mask=m).to(tl.float32)
    mu = tl.load(mean_ptr + cs * s_mean, mask=m).to(tl.float32)
    var = tl.load(var_ptr + cs * s_var, mask=m).to(tl.float32)
    keep = 1.0 - momentum
    tl.store(rm_ptr + cs * s_rm, (momentum * mu + keep * rm).to(rm_ptr.dtype.element_ty),
             mask=m)
    tl.store(rv_ptr + cs * s_rv,
             (momentum * (var * unbias) + keep * rv).to(rv_ptr.dtype.element_ty), mask=m)


def _check_input(input: Tensor, op: str) -> Tuple[int, int, int]:
    if input.dim() < 2:
        raise ValueError(f"slimops.kernels.{op}: input must be [N, C, *], got {tuple(input.shape)}")
    return input.shape[0], input.shape[1], math.prod(input.shape[2:])


def _stride(v: Optional[Tensor]) -> int:
    return 0 if v is None else v.stride(0)


def merge_moments(moments: Tensor) -> Tensor:
    """Run the merge tree on fp32 ``[3, R, C]`` moments until at most ``MERGE_ROWS`` rows
    remain (``merge_plan``); returns the ``[3, r, C]`` moments the finalize reads."""
    c = moments.shape[2]
    plan = merge_plan(moments.shape[1])
    for rows, out_rows in zip(plan, plan[1:]):
        dst = torch.empty((3, out_rows, c), dtype=torch.float32, device=moments.device)
        grid, args, kwargs = _merge_launch(moments, dst, rows)
        traceable(_bn_merge_kernel)[grid](*args, **kwargs)
        moments = dst
    return moments


Launch = Tuple[Tuple[int, ...], Tuple[Any, ...], Dict[str, Any]]


def _merge_launch(moments: Tensor, dst: Tensor, rows: int) -> Launch:
    """``(grid, args, kwargs)`` of one merge-tree step, ``rows`` rows of ``moments`` into
    ``dst [3, out_rows, C]`` (the launch builders serve the launchers and the AOT cases,
    which pass meta tensors of real shapes)."""
    _, out_rows, c = dst.shape
    return ((out_rows, triton.cdiv(c, MERGE_BLOCK_C)), (moments, dst, c, rows, out_rows),
            dict(ROWS=MERGE_ROWS, BLOCK_C=MERGE_BLOCK_C, num_warps=MERGE_WARPS))


def _finalize_launch(
    x: Tensor, moments: Optional[Tensor], count: int, weight: Optional[Tensor],
    bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
    training: bool, eps: float, mean: Tensor, var: Tensor, alpha: Tensor, beta: Tensor,
) -> Launch:
    """``(grid, args, kwargs)`` of the finalize (``moments``: the merged ``[3, r, C]``, or
    None in eval)."""
    c = x.shape[1]
    # Absent tensors: dummies of the right dtype, so the signature stays the same.
    args = (
        alpha if moments is None else moments,
        x if running_mean is None else running_mean, x if running_var is None else running_var,
        x if weight is None else weight, x if bias is None else bias,
        mean, var, alpha, beta,
        # 1 / count in Python: exact in double, then one rounding to fp32.
        c, 0 if moments is None else moments.shape[1], 1.0 / max(count, 1), float(eps),
        _stride(running_mean), _stride(running_var), _stride(weight), _stride(bias),
    )
    kwargs = dict(TRAINING=training, HAS_W=weight is not None, HAS_B=bias is not None,
                  ROWS=MERGE_ROWS, BLOCK_C=MERGE_BLOCK_C, num_warps=MERGE_WARPS)
    return (triton.cdiv(c, MERGE_BLOCK_C),), args, kwargs


def _stats_launch(x: Tensor, moments: Tensor, per_tile: int, cfg: Dict[str, int]) -> Launch:
    """``(grid, args, kwargs)`` of the statistics' stage 1 (``moments [3, num_tiles, C]``)."""
    n, c, hw = _check_input(x, "batch_norm_act")
    num_tiles = moments.shape[1]
    return ((num_tiles, c), (x, moments, c, hw, n * hw, per_tile, num_tiles),
            dict(BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"]))


def _backward_stats_launch(
    go: Tensor, y: Tensor, x: Tensor, mean: Tensor, psg: Tensor, psgx: Tensor, per_tile: int,
    activation: int, cfg: Dict[str, int],
) -> Launch:
    """``(grid, args, kwargs)`` of the backward's reduction (``psg``/``psgx``
    ``[num_tiles, C]``)."""
    n, c, hw = _check_input(x, "batch_norm_act_backward")
    return ((psg.shape[0], c),
            (go, y, x, mean, psg, psgx, c, hw, n * hw, per_tile, mean.stride(0)),
            dict(ACT=activation, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"]))


def _backward_finalize_launch(
    psg: Tensor, psgx: Tensor, x: Tensor, weight: Optional[Tensor], var: Tensor,
    grad_weight: Tensor, grad_bias: Tensor, kg: Tensor, kx: Tensor, k0: Tensor, count: int,
    eps: float, training: bool,
) -> Launch:
    """``(grid, args, kwargs)`` of the backward's finalize."""
    c = x.shape[1]
    args = (psg, psgx, x if weight is None else weight, var, grad_weight, grad_bias, kg, kx, k0,
            c, psg.shape[0], 1.0 / count, float(eps), _stride(weight), var.stride(0))
    kwargs = dict(TRAINING=training, HAS_W=weight is not None, BLOCK_T=FINAL_BLOCK_T,
                  BLOCK_C=FINAL_BLOCK_C, num_warps=FINAL_WARPS)
    return (triton.cdiv(c, FINAL_BLOCK_C),), args, kwargs


def _backward_apply_launch(
    go: Tensor, y: Tensor, x: Tensor, mean: Tensor, kg: Tensor, kx: Tensor, k0: Tensor,
    grad_input: Tensor, activation: int, training: bool,
) -> Launch:
    """``(grid, args, kwargs)`` of the backward's elementwise pass."""
    n, c, hw = _check_input(x, "batch_norm_act_backward")
    grid, ecfg = flat_launch(x.numel(), CONFIGS)
    return (grid, (go, y, x, mean, kg, kx, k0, grad_input, x.numel(), c, hw, mean.stride(0)),
            dict(ACT=activation, TRAINING=training, BLOCK=ecfg["BLOCK"],
                 num_warps=ecfg["num_warps"]))


def _running_stats_launch(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                          count: int, momentum: float) -> Launch:
    """``(grid, args, kwargs)`` of the running statistics' update."""
    c = running_mean.shape[0]
    # The unbiasing factor in Python: exact in double, then one rounding to fp32 (as the
    # CPU op's static_cast).
    args = (running_mean, running_var, mean, var, c, float(momentum), count / (count - 1),
            running_mean.stride(0), running_var.stride(0), mean.stride(0), var.stride(0))
    return ((triton.cdiv(c, RUNNING_STATS_BLOCK),), args,
            dict(BLOCK=RUNNING_STATS_BLOCK, num_warps=RUNNING_STATS_WARPS))


def _finalize_and_apply(
    x: Tensor, moments: Optional[Tensor], count: int, mean_dtype: torch.dtype,
    weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], training: bool, eps: float, residual: Optional[Tensor],
    activation: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The merge tree (training), the finalize (moments or running statistics -> mean, var,
    alpha, beta; ``mean``/``var`` stored in ``mean_dtype``) and the normalise pass."""
    c = x.shape[1]
    dev = x.device
    mean = torch.empty((c,), dtype=mean_dtype, device=dev)
    var = torch.empty((c,), dtype=mean_dtype, device=dev)
    alpha = torch.empty((c,), dtype=torch.float32, device=dev)
    beta = torch.empty((c,), dtype=torch.float32, device=dev)
    if moments is not None:
        moments = merge_moments(moments)
    grid, args, kwargs = _finalize_launch(x, moments, count, weight, bias, running_mean,
                                          running_var, training, eps, mean, var, alpha, beta)
    traceable(_bn_finalize_kernel)[grid](*args, **kwargs)
    out = epilogue(x, None, alpha, beta, residual, activation)
    return out, mean, var


def _check_common(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    activation: int, op: str,
) -> Tuple[int, int, int]:
    _check_activation(activation)
    n, c, hw = _check_input(input, op)
    _check_vector(weight, c, "weight")
    _check_vector(bias, c, "bias")
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"slimops.kernels.{op}: residual shape {tuple(residual.shape)} differs "
                         f"from the input's {tuple(input.shape)}")
    return n, c, hw


def batch_norm_act(
    input: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float,
    residual: Optional[Tensor],
    activation: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``slimops::batch_norm_act``: ``act(batch_norm(input) + residual)``.

    ``input [N, C, *]``; ``weight``/``bias`` (γ, β) and ``running_mean``/``running_var``:
    length-``C`` vectors or None, read through their strides. Training normalises with the
    batch statistics (per-tile moments merged by a fixed tree: deterministic), eval with the
    running ones
    (required then); the running stats are never written (the op is functional: the caller
    folds the returned statistics in). Returns ``(out, mean, var)``: ``out`` contiguous in
    the input's dtype, ``mean``/``var`` (biased) the statistics used (the batch ones, or the
    running ones read back in eval) in ``stats_dtype(input.dtype)``: fp32 for every dtype
    these kernels take.
    """
    check_device(input, weight, bias, running_mean, running_var, residual)
    n, c, hw = _check_common(input, weight, bias, residual, activation, "batch_norm_act")
    _check_vector(running_mean, c, "running_mean")
    _check_vector(running_var, c, "running_var")
    if eps < 0:
        raise ValueError(f"slimops.kernels.batch_norm_act: eps must be non-negative, got {eps}")
    count = n * hw
    if training:  # the statistics kernel walks a channel's values with one 32-bit index
        check_int32("batch_norm_act", values_per_channel=count)
    if training and count <= 1:
        raise ValueError(f"slimops.kernels.batch_norm_act: expected more than 1 value per channel "
                         f"when training, got input of shape {tuple(input.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("slimops.kernels.batch_norm_act: eval mode needs running_mean and running_var")
    x = input.contiguous()
    # The op's contract (CPU op, CUDA C++ kernel, fake): statistics in stats_dtype, fp32
    # here, so an fp16/bf16 layer's saved variance is not rounded before the backward.
    sdt = stats_dtype(x.dtype)
    if not training:
        return _finalize_and_apply(x, None, count, sdt, weight, bias, running_mean,
                                   running_var, False, eps, residual, activation)
    cfg = _reduce_config(count)
    num_tiles, per_tile = reduction_split(count, c, cfg, _device_sms(x.device))
    # Every (tile, channel) program writes its row: no zero fill.
    moments = torch.empty((3, num_tiles, c), dtype=torch.float32, device=x.device)
    grid, args, kwargs = _stats_launch(x, moments, per_tile, cfg)
    traceable(_bn_stats_kernel)[grid](*args, **kwargs)
    return _finalize_and_apply(x, moments, count, sdt, weight, bias, None, None, True,
                               eps, residual, activation)


def batch_norm_act_from_partials(
    z: Tensor,
    moments: Tensor,
    count: int,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor],
    activation: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Training-mode ``batch_norm_act`` of ``z [N, C, *]`` from precomputed moments.

    ``moments``: fp32 ``[3, R, C]``, planes count, mean and M2 (sum of squared deviations
    from that row's mean) of disjoint pieces of each channel's values of ``z``, ``count``
    values per channel in all (a row may be empty: count 0): what a convolution with a
    statistics epilogue writes (``store_tile_moments``), so the batch norm does not read
    ``z`` an extra time. Merges them (Chan's formula, a fixed tree) into the batch mean and
    biased variance and normalises. Returns ``(out, mean, var)``: ``out`` in ``z``'s dtype,
    ``mean``/``var`` fp32 for every dtype (what the fused ops save for the backward).
    """
    check_device(z, moments, weight, bias, residual)
    n, c, hw = _check_common(z, weight, bias, residual, activation, "batch_norm_act_from_partials")
    if moments.dtype != torch.float32 or moments.dim() != 3 or moments.shape[0] != 3 \
            or moments.shape[2] != c:
        raise ValueError(f"slimops.kernels.batch_norm_act_from_partials: moments must be fp32 "
                         f"[3, rows, {c}], got {moments.dtype} {tuple(moments.shape)}")
    if count <= 1:
        raise ValueError(f"slimops.kernels.batch_norm_act_from_partials: count must be > 1, got {count}")
    return _finalize_and_apply(z.contiguous(), moments.contiguous(), int(count),
                               stats_dtype(z.dtype),
                               weight, bias, None, None, True, eps, residual, activation)


def batch_norm_act_backward(
    grad_out: Tensor,
    input: Tensor,
    out: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    eps: float,
    training: bool,
    activation: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``slimops::batch_norm_act_backward``: ``(grad_input, grad_weight, grad_bias)``.

    ``mean``/``var``: the statistics the forward returned (batch ones in training, running
    ones in eval), fp32 (what ``batch_norm_act`` and the fused conv + BN ops return) or in
    the input's dtype; read as fp32 either way. ``out``: the forward's output (the activation's
    mask is read from it).
    In training the gradient also flows through the batch statistics. ``grad_weight`` and
    ``grad_bias`` have length ``C`` (the active width; computed even when ``weight`` is
    None, as the CPU op does) and the input's dtype.
    """
    check_device(grad_out, input, out, weight, mean, var)
    n, c, hw = _check_common(input, weight, None, None, activation, "batch_norm_act_backward")
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != input.shape:
            raise ValueError(f"slimops.kernels.batch_norm_act_backward: {name} shape "
                             f"{tuple(t.shape)} differs from the input's {tuple(input.shape)}")
    _check_vector(mean, c, "mean")
    _check_vector(var, c, "var")
    # The reduction kernel walks a channel's values with one 32-bit index.
    check_int32("batch_norm_act_backward", values_per_channel=n * hw)
    x = input.contiguous()
    go = grad_out.contiguous()
    y = out.contiguous()
    dev = x.device
    grad_input = torch.empty_like(x)
    grad_weight = torch.empty((c,), dtype=x.dtype, device=dev)
    grad_bias = torch.empty((c,), dtype=x.dtype, device=dev)
    count = n * hw
    if count == 0:
        return grad_input, grad_weight.zero_(), grad_bias.zero_()
    cfg = _reduce_config(count)
    num_tiles, per_tile = reduction_split(count, c, cfg, _device_sms(dev))
    psg = torch.empty((num_tiles, c), dtype=torch.float32, device=dev)
    psgx = torch.empty_like(psg)
    grid, args, kwargs = _backward_stats_launch(go, y, x, mean, psg, psgx, per_tile, activation,
                                                cfg)
    traceable(_bn_backward_stats_kernel)[grid](*args, **kwargs)
    kg = torch.empty((c,), dtype=torch.float32, device=dev)
    kx = torch.empty_like(kg)
    k0 = torch.empty_like(kg)
    grid, args, kwargs = _backward_finalize_launch(psg, psgx, x, weight, var, grad_weight,
                                                   grad_bias, kg, kx, k0, count, eps, training)
    traceable(_bn_backward_finalize_kernel)[grid](*args, **kwargs)
    grid, args, kwargs = _backward_apply_launch(go, y, x, mean, kg, kx, k0, grad_input,
                                                activation, training)
    traceable(_bn_backward_apply_kernel)[grid](*args, **kwargs)
    return grad_input, grad_weight, grad_bias


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float) -> None:
    """``slimops::update_running_stats`` on the GPU: fold a batch's statistics (``var``
    biased, over ``count`` values per channel) into the running ones in place, as
    ``F.batch_norm`` does (``running * (1 - momentum) + batch * momentum``, the variance
    unbiased by ``count / (count - 1)``). One launch per BN layer and width of a training
    step, where the aten ops it replaces (``lerp_``, ``mul_``, ``add_``, plus a cast each of
    the statistics into the buffers' dtype) were three to five.

    Every tensor is a vector of ``C`` values, any stride (the running buffers are prefix
    views of the full-width ones). Unlike the CPU op (one dtype throughout) the dtypes may
    differ: fp32 statistics (``stats_dtype``) fold into fp16/bf16/fp32 buffers without being
    rounded to the buffers' dtype first; arithmetic is fp32 and each buffer is rounded once.
    """
    check_device(running_mean, running_var, mean, var)
    c = running_mean.shape[0] if running_mean.dim() == 1 else -1
    if c < 0:
        raise ValueError(f"slimops.kernels.update_running_stats: running_mean must be a "
                         f"vector, got shape {tuple(running_mean.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("mean", mean), ("var", var)):
        _check_vector(t, c, name)
        if t.dtype not in DTYPES:
            raise ValueError(f"slimops.kernels.update_running_stats: {name} is {t.dtype}; "
                             f"the kernel takes {DTYPES}")
    if count <= 1:
        raise ValueError(f"slimops.kernels.update_running_stats: count must be above 1 (the "
                         f"unbiased variance divides by count - 1), got {count}")
    if c == 0:
        return
    grid, args, kwargs = _running_stats_launch(running_mean, running_var, mean, var, int(count),
                                               momentum)
    traceable(_running_stats_kernel)[grid](*args, **kwargs)


# The AOT cases' calls, S-MobileNet v2 (width 1.0) activations [N, C, H, W]: every tuning
# entry of every kernel is reached by one of them (the reductions pick by N * H * W, the
# elementwise passes by the element count).
# Forward: (shape, training, residual + relu6, moments rows from a conv's statistics
# epilogue (batch_norm_act_from_partials) or None).
AOT_FORWARD = [
    # reduction entry 0, one tile per channel (more channels than the 16 x 132 resident
    # programs: the shared-BN last conv, the unfused op's layer in S-MobileNet v2 training)
    ((32, 1280, 7, 7), True, False, None),
    ((32, 192, 28, 28), True, True, None),  # reduction entry 1
    ((32, 144, 56, 56), True, False, None),  # reduction entry 2
    # the merge tree: the 1x1 conv's 128-pixel tiles at 56x56, 32 x 25 rows of moments
    ((32, 144, 56, 56), True, False, 800),
    ((1, 320, 7, 7), False, False, None), ((1, 320, 7, 7), False, True, None),  # apply entry 0
    ((1, 1280, 7, 7), False, False, None), ((1, 1280, 7, 7), False, True, None),  # entry 1
]
# Backward: shapes (each with and without relu6, in training and eval, with fp32 statistics
# and, for fp16/bf16, statistics in the input's dtype): the reductions' entries 2, 1, 0 and
# the elementwise pass's 2, 1, 0 (batch 1: eval-mode backward, e.g. fine-tuning with frozen
# statistics).
AOT_BACKWARD = [(32, 144, 56, 56), (32, 192, 28, 28), (1, 320, 7, 7), (1, 160, 7, 7)]
AOT_EPS = 1e-5
# Resident blocks per SM each kernel's AOT cases must keep (regression floors under the
# JIT-exact figures of docs/GPU_KERNELS.md: at least 7 everywhere); the normalise pass is
# the epilogue kernel.
AOT_MIN_OCCUPANCY = {k: 4 for k in ("_bn_merge_kernel", "_bn_stats_kernel",
                                    "_bn_finalize_kernel", "_bn_backward_stats_kernel",
                                    "_bn_backward_finalize_kernel", "_bn_backward_apply_kernel",
                                    "_epilogue_kernel", "_running_stats_kernel")}
# The running statistics' update: S-MobileNet v2's widest BN (1280 channels, a prefix view:
# stride 1 as the full buffer's), fp32 statistics into buffers of each dtype.
AOT_RUNNING_STATS_C = 1280
AOT_RUNNING_STATS_COUNT = 32 * 7 * 7


def _aot_forward(shape: Tuple[int, ...], dtype: torch.dtype, training: bool, fused: bool,
                 rows: Optional[int]) -> List[Tuple[str, Any, Launch]]:
    """``(kind, kernel, launch)`` of every launch of ``batch_norm_act`` (or, with ``rows``,
    ``batch_norm_act_from_partials``) at ``shape``, meta tensors, the GPU's picks."""
    x = meta_tensor(shape, dtype)
    n, c, hw = _check_input(x, "batch_norm_act")
    count = n * hw
    vec, f32 = meta_tensor((c,), dtype), meta_tensor((c,), torch.float32)
    sdt = meta_tensor((c,), stats_dtype(dtype))
    out: List[Tuple[str, Any, Launch]] = []
    moments = None
    if training and rows is None:
        cfg = _reduce_config_gpu(count)
        tiles, per_tile = reduction_split(count, c, cfg, AOT_SMS)
        moments = meta_tensor((3, tiles, c), torch.float32)
        out.append(("stats", _bn_stats_kernel, _stats_launch(x, moments, per_tile, cfg)))
    elif training:
        moments = meta_tensor((3, rows, c), torch.float32)
    if moments is not None:
        plan = merge_plan(moments.shape[1])
        for r, out_rows in zip(plan, plan[1:]):
            dst = meta_tensor((3, out_rows, c), torch.float32)
            out.append(("merge", _bn_merge_kernel, _merge_launch(moments, dst, r)))
            moments = dst
    w = vec if training else None
    rm = None if training else vec
    out.append(("finalize", _bn_finalize_kernel, _finalize_launch(
        x, moments, count, w, w, rm, rm, training, AOT_EPS, sdt, sdt, f32, f32)))
    out.append(("apply", _epilogue_kernel, _epilogue_launch(
        x, None, f32, f32, x if fused else None, x, ACT_RELU6 if fused else ACT_NONE)))
    return out


def _aot_backward(shape: Tuple[int, ...], dtype: torch.dtype, activation: int, training: bool,
                  mean_dtype: torch.dtype) -> List[Tuple[str, Any, Launch]]:
    """``(kind, kernel, launch)`` of every launch of ``batch_norm_act_backward``."""
    x = meta_tensor(shape, dtype)
    n, c, hw = _check_input(x, "batch_norm_act_backward")
    count = n * hw
    vec, f32, mean = (meta_tensor((c,), t) for t in (dtype, torch.float32, mean_dtype))
    cfg = _reduce_config_gpu(count)
    tiles, per_tile = reduction_split(count, c, cfg, AOT_SMS)
    psg = meta_tensor((tiles, c), torch.float32)
    return [
        ("backward_stats", _bn_backward_stats_kernel,
         _backward_stats_launch(x, x, x, mean, psg, psg, per_tile, activation, cfg)),
        ("backward_finalize", _bn_backward_finalize_kernel,
         _backward_finalize_launch(psg, psg, x, vec, mean, vec, vec, f32, f32, f32, count,
                                   AOT_EPS, training)),
        ("backward_apply", _bn_backward_apply_kernel,
         _backward_apply_launch(x, x, x, mean, f32, f32, f32, x, activation, training)),
    ]


def _aot_call(kind: str, shape: Tuple[int, ...], dtype: torch.dtype, *flags: Any) -> None:
    """The public launcher of an AOT call on CPU tensors (``flags``: ``_aot_forward``'s or
    ``_aot_backward``'s after the dtype; the running statistics' update: ``shape`` is
    ``(C,)``)."""
    if kind == "running_stats":
        (c,) = shape
        stats = torch.ones(c, dtype=torch.float32)
        update_running_stats(torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), stats,
                             stats, AOT_RUNNING_STATS_COUNT, 0.1)
        return
    x = torch.empty(shape, dtype=dtype)
    c = shape[1]
    vec = torch.empty(c, dtype=dtype)
    if kind == "forward":
        training, fused, rows = flags
        act, res = (ACT_RELU6, x) if fused else (ACT_NONE, None)
        if rows is not None:
            moments = torch.empty((3, rows, c), dtype=torch.float32)
            batch_norm_act_from_partials(x, moments, x.numel() // c, vec, vec, AOT_EPS, res, act)
        elif training:
            batch_norm_act(x, vec, vec, None, None, True, AOT_EPS, res, act)
        else:
            batch_norm_act(x, None, None, vec, vec, False, AOT_EPS, res, act)
    else:
        activation, training, mean_dtype = flags
        mean = torch.empty(c, dtype=mean_dtype)
        batch_norm_act_backward(x, x, x, vec, mean, mean, AOT_EPS, training, activation)


def aot_cases() -> List[AotCase]:
    """The binaries the launchers compile at ``AOT_FORWARD`` / ``AOT_BACKWARD``, specialised
    exactly as triton's JIT specialises their launches (``launch_case`` on the launch
    builders' argument lists, meta tensors of the real shapes, the reductions split for an
    H100 as ``reduction_split`` does there, ``AOT_SMS``): the merge-tree kernel (fp32
    moments); per dtype the statistics and backward kernels for every tuning entry, the
    finalize kernels in training (with γ/β) and eval (without), the normalise pass (the
    epilogue kernel with fp32 alpha/beta) without and with residual + relu6, and the
    backward's elementwise pass in training/eval without and with relu6, and the running
    statistics' update (fp32 statistics into buffers of the dtype). The forward stores
    ``stats_dtype`` statistics (fp32; ``*_f32stats`` for fp16/bf16); the backward kernels
    are compiled for fp32 statistics (``*_f32stats``) and for statistics in the input's
    dtype, which the backward launcher also accepts. One case per name (kernel, dtype,
    tuning entry, flags): the first call that reaches it; ``meta["call"]`` runs that call's
    launcher on CPU tensors."""
    cases: Dict[str, AotCase] = {}

    def add(name: str, kernel: Any, launch: Launch, call: Any, shape: Tuple[int, ...]) -> None:
        if name not in cases:
            cases[name] = launch_case(name, kernel, launch, meta=dict(shape=shape, call=call))

    for dtype in DTYPES:
        tag = str(dtype).split(".")[-1]
        f32sfx = "" if dtype == torch.float32 else "_f32stats"
        for shape, training, fused, rows in AOT_FORWARD:
            call = functools.partial(_aot_call, "forward", shape, dtype, training, fused, rows)
            for kind, kernel, launch in _aot_forward(shape, dtype, training, fused, rows):
                kw = launch[2]
                if kind == "merge":
                    name = "bn_merge"
                elif kind == "stats":
                    name = f"bn_stats_{tag}_b{kw['BLOCK']}_w{kw['num_warps']}"
                elif kind == "finalize":
                    name = f"bn_finalize_{tag}_{'train' if training else 'eval'}{f32sfx}"
                else:
                    name = (f"bn_apply_{tag}_b{kw['BLOCK']}_w{kw['num_warps']}_"
                            f"{'res_relu6' if fused else 'plain'}")
                add(name, kernel, launch, call, shape)
        mean_dtypes = [torch.float32] + ([] if dtype == torch.float32 else [dtype])
        for shape in AOT_BACKWARD:
            for act in (ACT_NONE, ACT_RELU6):
                for training in (True, False):
                    for mean_dtype in mean_dtypes:
                        sfx = f32sfx if mean_dtype == torch.float32 else ""
                        call = functools.partial(_aot_call, "backward", shape, dtype, act,
                                                 training, mean_dtype)
                        act_tag = "relu6" if act else "plain"
                        mode = "train" if training else "eval"
                        for kind, kernel, launch in _aot_backward(shape, dtype, act, training,
                                                                  mean_dtype):
                            kw = launch[2]
                            block = f"b{kw.get('BLOCK')}_w{kw['num_warps']}"
                            name = {
                                "backward_stats": f"bn_backward_stats_{tag}_{block}_{act_tag}{sfx}",
                                "backward_finalize": f"bn_backward_finalize_{tag}_{mode}{sfx}",
                                "backward_apply": (f"bn_backward_apply_{tag}_{block}_{act_tag}_"
                                                   f"{mode}{sfx}"),
                            }[kind]
                            add(name, kernel, launch, call, shape)
        rs = functools.partial(_aot_call, "running_stats", (AOT_RUNNING_STATS_C,), dtype)
        buf, f32 = (meta_tensor((AOT_RUNNING_STATS_C,), t) for t in (dtype, torch.float32))
        add(f"bn_running_stats_{tag}{f32sfx}", _running_stats_kernel,
            _running_stats_launch(buf, buf, f32, f32, AOT_RUNNING_STATS_COUNT, 0.1), rs,
            (AOT_RUNNING_STATS_C,))
    return with_floors(list(cases.values()), AOT_MIN_OCCUPANCY)


__all__ = [
    "CONFIGS",
    "aot_cases",
    "batch_norm_act",
    "batch_norm_act_backward",
    "batch_norm_act_from_partials",
    "finalize_rows_per_program",
    "merge_moments",
    "merge_plan",
    "serial_finalize_iterations",
    "store_tile_moments",
    "update_running_stats",
]
