"""Triton kernels of the slimmable depthwise convolution and its two backward ops.

The active weight is the prefix ``W[:C]`` of the full ``[C_full, 1, kh, kw]`` weight (``C`` =
the input's channels). Every kernel reads it in place through the full tensor's strides:
slicing + ``contiguous()`` would copy the shared weight on every call, which is exactly what
slimops exists to avoid.

* Forward (``depthwise_conv2d``): a direct convolution, one program per (image-channel plane,
  strip of output columns, group of row tiles). A tile is ``ROWS`` output rows x ``G`` lanes,
  each lane (thread) computing ``V`` consecutive outputs of a row: it loads the input row
  segment its outputs read once per tap row, as ``V``-column chunks (one 16-byte vector load
  each when the rows are aligned: W and the input's strides multiples of ``V``; a 3x3's
  one-column halo as a scalar; ``V`` at most 2 past 3x3, to bound the registers) and reuses every element for all the (output, tap) pairs that
  read it, in registers. The channel's taps (and bias/scale/shift) are loaded once per
  program, which loops over its row tiles. ``kh``/``kw`` and the W-direction stride, padding
  and dilation are compile-time constants (they fix which window element each (output, tap)
  reads); the H-direction geometry is a run-time argument. The epilogue
  ``act((z + bias[c]) * scale[c] + shift[c] + residual)`` is fused into the same pass, each
  term switched by a constexpr flag so an absent term costs nothing.
* Forward with statistics (``depthwise_conv2d_with_stats``): the same kernel under the
  ``STATS`` constexpr (bias only, no other epilogue) also stores the moments (count, mean,
  M2) of each tile's stored outputs into row ``n * tiles + tile``, column ``c`` of an fp32
  ``[3, N * tiles, C]`` buffer: deterministic, no atomics; the batch norm
  (``batch_norm_act_from_partials``) merges the rows.
* Input gradient (``depthwise_conv2d_backward_input``): a gather (each input pixel sums the
  output-gradient pixels that read it: no atomics, deterministic) built like the forward:
  row tiles, the channel's taps in registers, each lane ``stride_w * V`` consecutive
  input-gradient columns of a row that read ``V`` (+ halo) grad_z columns, loaded once per
  tap row in ``V``-column (vector) chunks. Which (column, tap) pairs meet, and at which
  grad_z column, is fixed at compile time by the lane's column phase (``kw`` and the
  W-direction stride, padding and dilation are constants), so there is no div/mod along W;
  along H one division by the constant stride per lane and tap row. At stride 1 this is the
  forward with the kernel rotated by 180 degrees and padding ``(k - 1) * dil - pad`` (which
  may be negative: the window then starts right of the lane's column).
* Weight gradient (``depthwise_conv2d_backward_weight``): per (channel, tap) a reduction over
  ``N * Ho * Wo``. Two deterministic stages: stage 1 gives each (tile, channel) program a
  fixed range of output pixels and writes fp32 partial sums ``[T, C, TAPS]``; stage 2 sums
  them in a fixed order, one program per channel. Splitting the range into tiles keeps the
  GPU busy at narrow widths (few channels, large planes) where one program per channel
  would not. The result has the full weight's shape, the prefix filled and the rest zero.

Accumulation is fp32 for every input dtype; outputs are in the input's dtype.
"""

from __future__ import annotations

import functools

from typing import Any, Dict, List, Optional, Sequence, Tuple

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
    conv_geometry,
    image_span,
    traceable,
)
from slimops.kernels.batch_norm_act import store_tile_moments
from slimops.kernels.epilogue import (
    DTYPES,
    _add_residual_activate_store,
    _check_activation,
    _check_vector,
    _sum_combine,
    AOT_TARGET_PROGRAMS,
    launch_case,
    meta_tensor,
    with_floors,
    split_tiles,
)

# The weight gradient's configurations (``_pick``, by output plane size). WTILE: elements of
# the per-program tile [TAPS, WTILE // TAPS] (taps padded to a power of two), so the tile,
# and with it the registers per thread, stays the same size for 3x3 and 5x5 kernels.
CONFIGS: List[Dict[str, int]] = [
    {"WTILE": 1024, "num_warps": 2},
    {"WTILE": 1024, "num_warps": 4},
    {"WTILE": 2048, "num_warps": 4},
    {"WTILE": 2048, "num_warps": 8},
]

# Forward tiling (_forward_tiling): bytes per vector load/store (128-bit LDG/STG); outputs
# per lane when the rows are not aligned; lanes (threads) per tile, at most four warps; about
# as many programs as the launch should have (row tiles are split among programs until the
# grid has that many; beyond that each program loops over its tiles, loading its channel's
# taps once).
VECTOR_BYTES = 16
MAX_UNALIGNED_V = 4
# Past 3x3 a lane's window (one input row segment) and taps get large: 8 outputs per lane of
# a 5x5 at stride 2 needed all 255 registers and a stack (fp16, as AOT-compiled), 4 still
# left the bf16 5x5 a stack slot on sm_90; 2 compiles every 5x5 case without. Unaligned rows
# take at most this many too: compiled as the JIT specialises a 7x7 plane (the AOT cases),
# 4 per lane gave the fp16 5x5 with the full epilogue a 40-112 B stack on sm_90.
MAX_V_LARGE_KERNEL = 2
MAX_TILE_LANES = 128
TARGET_PROGRAMS = 2048

# Stage 2 of the weight gradient: partial tiles summed per loop iteration.
REDUCE_BLOCK_T = 16
# Kernel sizes the AOT sweep compiles (the MobileNet family's depthwise kernels), and the
# forward's lanes across a row strip there (two warps: 8 lanes x 8 rows).
AOT_KERNEL_SIZES = (3, 5)
AOT_LANES_PER_ROW = 8


def _pick(pixels: int) -> Dict[str, int]:
    """The weight gradient's configuration for output planes of ``pixels`` pixels: small
    planes (the late MobileNet stages, 7x7 and 14x14) take small tiles and few warps, large
    planes large ones."""
    if pixels <= 64:
        return CONFIGS[0]
    if pixels <= 4096:
        return CONFIGS[1]
    return CONFIGS[2] if pixels <= 1 << 16 else CONFIGS[3]


def _forward_tiling(input: Tensor, ho: int, wo: int, taps: int = 9,
                    max_v: int = VECTOR_BYTES) -> Dict[str, int]:
    """The forward kernel's tiling for ``input [N, C, H, W]``, an ``ho x wo`` output and a
    kernel of ``taps`` taps (``V`` at most ``max_v``: the input gradient's bound, see
    ``_backward_input_tiling``).

    ``V``: outputs per lane (thread) along W, the widest power of two <= 16 bytes of the
    dtype (at most ``MAX_V_LARGE_KERNEL`` past 3x3) for which ``ALIGNED`` holds: the input's W stride is 1 and W and its other strides
    are multiples of ``V``, so every ``V``-column chunk of an input row starts on a
    ``V``-element boundary and lies entirely inside or outside the row (one vector load per
    chunk). Otherwise ``ALIGNED`` is False and ``V`` is ``MAX_UNALIGNED_V`` (at most
    ``MAX_V_LARGE_KERNEL`` past 3x3): per-element
    masks and scalar loads, each element still loaded once and reused by the lane's outputs.
    ``OUT_V``: the widest power of two <= ``V`` (1 when not aligned) dividing Wo: the width
    of the output stores and residual loads (a stride-2 output is half as wide as its
    input). ``G``: lanes across a strip of ``G * V`` output columns (``strips`` strips cover
    Wo); ``ROWS``: output rows per tile (``ROWS * G`` lanes, ``num_warps`` warps);
    ``row_tiles = cdiv(Ho, ROWS)`` tiles per strip, looped over by ``row_groups`` programs
    of ``tiles_per_prog`` tiles each, so the channel's taps are loaded once per program and
    there are still about ``TARGET_PROGRAMS`` programs. The rows' alignment is all this
    checks: a data pointer that is not 16-byte aligned only keeps the compiler from
    vectorising (the JIT gives no alignment hint then), the results are the same.
    """
    n, c, h, w = (int(s) for s in input.shape)
    sxn, sxc, sxh, sxw = input.stride()
    v = min(VECTOR_BYTES // input.element_size(), max_v)
    if taps > 9:
        v = min(v, MAX_V_LARGE_KERNEL)
    while v > 1 and not (sxw == 1 and all(x % v == 0 for x in (w, sxh, sxc, sxn))):
        v //= 2
    aligned = v > 1
    if not aligned:
        v = MAX_UNALIGNED_V if taps <= 9 else min(MAX_UNALIGNED_V, MAX_V_LARGE_KERNEL)
        v = min(v, max_v)
    out_v = v if aligned else 1
    while wo % out_v:
        out_v //= 2
    g = min(triton.next_power_of_2(triton.cdiv(wo, v)), MAX_TILE_LANES)
    # Lanes per tile: the fewest computed rows past Ho (a partial last tile idles lanes),
    # then the fewest lanes (more row tiles per program: the prologue, taps included, is
    # paid once per program); 32 lanes only for planes too small for 64.
    choices = [n_l for n_l in (MAX_TILE_LANES, MAX_TILE_LANES // 2) if n_l >= g] or [g]
    if g * ho <= 32:
        choices = [max(g, 32)]
    lanes = min(choices, key=lambda n_l: (triton.cdiv(ho, n_l // g) * (n_l // g), n_l))
    rows = lanes // g
    strips = triton.cdiv(wo, g * v)
    row_tiles = triton.cdiv(ho, rows)
    wanted = max(1, triton.cdiv(TARGET_PROGRAMS, max(1, n * c * strips)))
    tiles_per_prog = triton.cdiv(row_tiles, min(row_tiles, wanted))
    # The grid's third dimension holds at most 65535 programs.
    tiles_per_prog = max(tiles_per_prog, triton.cdiv(row_tiles, 65535))
    return dict(V=v, G=g, ROWS=rows, ALIGNED=aligned, OUT_V=out_v, num_warps=max(1, lanes // 32),
                strips=strips, row_tiles=row_tiles, tiles_per_prog=tiles_per_prog,
                row_groups=triton.cdiv(row_tiles, tiles_per_prog))


def _taps_p2(kh: int, kw: int) -> int:
    return triton.next_power_of_2(kh * kw)


@triton.constexpr_function
def _cmax(a, b):
    return max(a, b)


@triton.constexpr_function
def _cmin(a, b):
    return min(a, b)


@triton.jit
def _split_columns(x, V: tl.constexpr):
    """The ``V`` columns of ``x [T, V]`` as a tuple of ``[T]`` tensors (column ``k`` at index
    ``k``). ``V`` is a power of two <= 8 and each thread holds its row's ``V`` elements (the
    loads that produce ``x`` are along ``V`` contiguous), so the splits are register moves."""
    T: tl.constexpr = x.shape[0]
    if V == 1:
        return (tl.reshape(x, (T,)),)
    elif V == 2:
        a, b = tl.split(x)
        return (a, b)
    elif V == 4:
        e, o = tl.split(tl.reshape(x, (T, 2, 2)))  # e: columns 0, 2; o: 1, 3
        x0, x2 = tl.split(e)
        x1, x3 = tl.split(o)
        return (x0, x1, x2, x3)
    else:
        tl.static_assert(V == 8)
        e, o = tl.split(tl.reshape(x, (T, 4, 2)))  # e: columns 0, 2, 4, 6; o: 1, 3, 5, 7
        ee, eo = tl.split(tl.reshape(e, (T, 2, 2)))  # ee: 0, 4; eo: 2, 6
        oe, oo = tl.split(tl.reshape(o, (T, 2, 2)))  # oe: 1, 5; oo: 3, 7
        x0, x4 = tl.split(ee)
        x2, x6 = tl.split(eo)
        x1, x5 = tl.split(oe)
        x3, x7 = tl.split(oo)
        return (x0, x1, x2, x3, x4, x5, x6, x7)


@triton.jit
def _join_columns(c, V: tl.constexpr):
    """The inverse of ``_split_columns``: a tuple of ``V`` ``[T]`` tensors as ``[T, V]``."""
    if V == 1:
        return tl.reshape(c[0], (c[0].shape[0], 1))
    elif V == 2:
        return tl.join(c[0], c[1])
    elif V == 4:
        T: tl.constexpr = c[0].shape[0]
        return tl.reshape(tl.join(tl.join(c[0], c[2]), tl.join(c[1], c[3])), (T, 4))
    else:
        tl.static_assert(V == 8)
        T: tl.constexpr = c[0].shape[0]
        e = tl.reshape(tl.join(tl.join(c[0], c[4]), tl.join(c[2], c[6])), (T, 4))
        o = tl.reshape(tl.join(tl.join(c[1], c[5]), tl.join(c[3], c[7])), (T, 4))
        return tl.reshape(tl.join(e, o), (T, 8))


@triton.jit
def _dw_forward_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, moments_ptr,
    C, H, W, Ho, Wo, row_tiles, tiles_per_prog,
    sxn, sxc, sxh, sxw, swc, swh, sww,
    bias_stride, scale_stride, shift_stride,
    stride_h, pad_h, dil_h,
    KH: tl.constexpr, KW: tl.constexpr, SW: tl.constexpr, PW: tl.constexpr,
    DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr,
    V: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, ALIGNED: tl.constexpr,
    OUT_V: tl.constexpr,
    STATS: tl.constexpr = False,
):
    # Program (plane, strip, row group): channel c of image n, output columns
    # [strip * G * V, (strip + 1) * G * V), row tiles [pid2 * tiles_per_prog, ...) of ROWS
    # output rows each. Lane l of a tile holds the V consecutive outputs of row l // G,
    # chunk l % G: one vector load per input chunk, V outputs per thread.
    plane = tl.program_id(0)
    n = plane // C
    c = plane % C
    lanes = tl.arange(0, ROWS * G)
    vv = tl.arange(0, V)
    ow0 = tl.program_id(1) * (G * V) + (lanes % G) * V  # first output column of the lane
    iw0 = ow0 * SW  # input column of window offset 0 (a multiple of V)
    # Window offsets (relative to iw0) the lane's outputs read: -PW .. O_HI, in aligned
    # chunks Q_LO .. Q_HI of V columns.
    O_HI: tl.constexpr = (V - 1) * SW + (KW - 1) * DW - PW
    Q_LO: tl.constexpr = -((PW + V - 1) // V)
    Q_HI: tl.constexpr = O_HI // V
    if ALIGNED:
        # The launcher checked that W and the input's n/c/h strides are multiples of V and
        # its w stride is 1; written as (s // V) * V so that the compiler sees the multiple
        # and vectorises the chunk loads.
        sxn = (sxn // V) * V
        sxc = (sxc // V) * V
        sxh = (sxh // V) * V
        sxw = 1
    # Wo is a multiple of OUT_V (<= V; 1 when unaligned): stores and residual loads are
    # vectors of OUT_V elements.
    Wo = (Wo // OUT_V) * OUT_V
    x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    # The channel's KH * KW taps, once per program, in registers (fp32).
    w_base = w_ptr + c.to(tl.int64) * swc
    wts = ()
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            wts = wts + (tl.load(w_base + i * swh + j * sww).to(tl.float32),)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c * bias_stride).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + c * scale_stride).to(tl.float32)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + c * shift_stride).to(tl.float32)
    out_base = plane.to(tl.int64) * Ho * Wo
    t_lo = tl.program_id(2) * tiles_per_prog
    t_hi = tl.minimum(t_lo + tiles_per_prog, row_tiles)
    for t in range(t_lo, t_hi):
        oh = t * ROWS + lanes // G
        lane_ok = (oh < Ho) & (ow0 < Wo)
        # The bias is where the sums start (one FFMA per tap, no separate add).
        accs = ()
        for v in tl.static_range(V):
            if HAS_BIAS:
                accs = accs + (tl.full([ROWS * G], 0.0, tl.float32) + bias,)
            else:
                accs = accs + (tl.full([ROWS * G], 0.0, tl.float32),)
        for i in tl.static_range(KH):
            ih = oh * stride_h - pad_h + i * dil_h
            row_ok = (oh < Ho) & (ih >= 0) & (ih < H)
            rptr = x_base + ih * sxh
            # win[k]: the input at column iw0 - PW + k, each element loaded once and
            # reused by every (output, tap) pair that reads it.
            win = ()
            for q in tl.static_range(Q_LO, Q_HI + 1):
                # This chunk's columns read: _cmax(q * V, -PW) .. _cmin(q * V + V - 1, O_HI)
                # (written out, not assigned: an assigned constexpr would become a tensor).
                if _cmax(q * V, -PW) == _cmin(q * V + V - 1, O_HI):
                    # One column of the chunk is read (a 3x3's halo): one scalar load.
                    col = iw0 + _cmax(q * V, -PW)
                    m = row_ok & (col >= 0) & (col < W)
                    e = tl.load(rptr + col * sxw, mask=m, other=0.0)
                    win = win + (e.to(tl.float32),)
                else:  # the chunk, one (vector) load
                    cols = iw0[:, None] + q * V + vv[None, :]
                    if ALIGNED:  # W % V == 0: a chunk is entirely inside the row or outside
                        cq = iw0 + q * V
                        m = (row_ok & (cq >= 0) & (cq < W))[:, None]
                    else:
                        m = row_ok[:, None] & (cols >= 0) & (cols < W)
                    chunk = tl.load(rptr[:, None] + cols * sxw, mask=m, other=0.0)
                    part = _split_columns(chunk.to(tl.float32), V)
                    for k in tl.static_range(_cmax(q * V, -PW) - q * V,
                                             _cmin(q * V + V - 1, O_HI) - q * V + 1):
                        win = win + (part[k],)
            new = ()
            for v in tl.static_range(V):
                a = accs[v]
                for j in tl.static_range(KW):
                    a += win[v * SW + j * DW] * wts[i * KW + j]
                new = new + (a,)
            accs = new
        acc = _join_columns(accs, V)  # [ROWS * G, V]
        ow = ow0[:, None] + vv[None, :]
        if OUT_V == V:  # the lane's V outputs are all inside the row or all outside
            omask = lane_ok[:, None]
        else:
            omask = lane_ok[:, None] & (ow < Wo)
        if STATS:
            # The moments (count, mean, M2) of the stored values (rounded to the output
            # dtype), so that batch norm normalises with the moments of the tensor it reads.
            # Row n * tiles + tile (tile = strip * row_tiles + t): unique per (image, tile) of
            # channel c. The [ROWS * G, V] tile as one column of ROWS * G * V values.
            R: tl.constexpr = ROWS * G * V
            valid = omask & (vv[None, :] >= 0)  # broadcast to the tile's shape
            store_tile_moments(
                moments_ptr, (n * tl.num_programs(1) + tl.program_id(1)) * row_tiles + t,
                (tl.num_programs(0) // C) * tl.num_programs(1) * row_tiles, C,
                c + tl.arange(0, 1), tl.arange(0, 1) < 1,
                tl.reshape(acc.to(out_ptr.dtype.element_ty), (R, 1)), tl.reshape(valid, (R,)))
        if HAS_SCALE:
            acc *= scale
        if HAS_SHIFT:
            acc += shift
        _add_residual_activate_store(acc, res_ptr, out_ptr, out_base + (oh * Wo)[:, None] + ow,
                                     omask, HAS_RES, ACT)


@triton.constexpr_function
def _store_columns(u):
    """The widest power of two <= 8 dividing ``u``: the input gradient's store chunks."""
    sc = 8
    while u % sc:
        sc //= 2
    return sc


@triton.jit
def _dw_backward_input_kernel(
    gz_ptr, w_ptr, gx_ptr,
    C, H, W, Ho, Wo, row_tiles, tiles_per_prog,
    sgn, sgc, sgh, sgw, swc, swh, sww,
    pad_h, dil_h,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PW: tl.constexpr, DW: tl.constexpr,
    V: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, ALIGNED: tl.constexpr,
    OUT_V: tl.constexpr,
):
    # The forward's machinery run backwards: input-gradient pixel (ih, iw) sums
    # gz[oh, ow] * w[i, j] over the taps with oh * SH - pad_h + i * dil_h == ih and
    # ow * SW - PW + j * DW == iw. Program (plane, strip, row group) as in the forward; lane l
    # of a tile computes the U = SW * V consecutive gradient columns iw0 .. iw0 + U - 1 of
    # row ih (iw0 = SW * m0, a multiple of SW), which read the grad_z columns m0 + e // SW
    # for e = u + PW - j * DW divisible by SW: which (output u, tap j) pairs meet, and at
    # which window element, is fixed at compile time (no per-tap div/mod along W; at
    # stride 1 this is the forward with the kernel rotated by 180 degrees). The window,
    # columns m0 + E_LO .. m0 + E_HI, is loaded once per tap row in V-column chunks (vector
    # loads when aligned) and every element reused from registers.
    plane = tl.program_id(0)
    n = plane // C
    c = plane % C
    lanes = tl.arange(0, ROWS * G)
    vv = tl.arange(0, V)
    U: tl.constexpr = SW * V
    SC: tl.constexpr = _store_columns(U)
    m0 = tl.program_id(1) * (G * V) + (lanes % G) * V  # first grad_z column of the window base
    iw0 = m0 * SW  # first gradient column of the lane
    E_LO: tl.constexpr = (PW - (KW - 1) * DW) // SW  # floor: the leftmost column any tap reads
    E_HI: tl.constexpr = (U - 1 + PW) // SW  # the rightmost
    Q_LO: tl.constexpr = E_LO // V  # the V-column chunks holding them
    Q_HI: tl.constexpr = E_HI // V
    if ALIGNED:
        # Checked by the launcher (grad_z's rows, as the forward's input rows).
        sgn = (sgn // V) * V
        sgc = (sgc // V) * V
        sgh = (sgh // V) * V
        sgw = 1
    # W is a multiple of OUT_V: the stores are vectors of OUT_V elements.
    W = (W // OUT_V) * OUT_V
    g_base = gz_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc
    w_base = w_ptr + c.to(tl.int64) * swc
    wts = ()
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            wts = wts + (tl.load(w_base + i * swh + j * sww).to(tl.float32),)
    out_base = plane.to(tl.int64) * H * W
    t_lo = tl.program_id(2) * tiles_per_prog
    t_hi = tl.minimum(t_lo + tiles_per_prog, row_tiles)
    for t in range(t_lo, t_hi):
        ih = t * ROWS + lanes // G
        lane_ok = (ih < H) & (iw0 < W)
        accs = ()
        for u in tl.static_range(U):
            accs = accs + (tl.full([ROWS * G], 0.0, tl.float32),)
        for i in tl.static_range(KH):
            # Tap row i reaches row ih from grad_z row oh = (ih + pad_h - i * dil_h) / SH when
            # that divides exactly (SH is a constant: a shift or a multiply, once per lane and
            # tap row, not per output).
            th = ih + pad_h - i * dil_h
            if SH == 1:
                oh = th
                row_ok = lane_ok & (th >= 0) & (th < Ho)
            else:
                thc = tl.maximum(th, 0)  # non-negative: // and % are exact floors
                oh = thc // SH
                row_ok = lane_ok & (th >= 0) & (thc - oh * SH == 0) & (oh < Ho)
            rptr = g_base + oh * sgh
            # win[k]: grad_z at column m0 + E_LO + k (zero outside the row).
            win = ()
            for q in tl.static_range(Q_LO, Q_HI + 1):
                if _cmax(q * V, E_LO) == _cmin(q * V + V - 1, E_HI):
                    col = m0 + _cmax(q * V, E_LO)
                    m = row_ok & (col >= 0) & (col < Wo)
                    e = tl.load(rptr + col * sgw, mask=m, other=0.0)
                    win = win + (e.to(tl.float32),)
                else:
                    cols = m0[:, None] + q * V + vv[None, :]
                    if ALIGNED:  # Wo % V == 0: a chunk is entirely inside the row or outside
                        cq = m0 + q * V
                        m = (row_ok & (cq >= 0) & (cq < Wo))[:, None]
                    else:
                        m = row_ok[:, None] & (cols >= 0) & (cols < Wo)
                    chunk = tl.load(rptr[:, None] + cols * sgw, mask=m, other=0.0)
                    part = _split_columns(chunk.to(tl.float32), V)
                    for k in tl.static_range(_cmax(q * V, E_LO) - q * V,
                                             _cmin(q * V + V - 1, E_HI) - q * V + 1):
                        win = win + (part[k],)
            new = ()
            for u in tl.static_range(U):
                a = accs[u]
                for j in tl.static_range(KW):
                    if (u + PW - j * DW) % SW == 0:
                        a += win[(u + PW - j * DW) // SW - E_LO] * wts[i * KW + j]
                new = new + (a,)
            accs = new
        # Stored in chunks of SC columns (U may exceed the widest join, or not be a power
        # of two at stride 3).
        row_base = out_base + (ih * W)[:, None]
        for s0 in tl.static_range(0, U, SC):
            cols_s = ()
            for k in tl.static_range(SC):
                cols_s = cols_s + (accs[s0 + k],)
            iw = iw0[:, None] + s0 + tl.arange(0, SC)[None, :]
            tl.store(gx_ptr + row_base + iw, _join_columns(cols_s, SC).to(gx_ptr.dtype.element_ty),
                     mask=lane_ok[:, None] & (iw < W))


@triton.jit
def _dw_weight_partials_kernel(
    gz_ptr, x_ptr, part_ptr,
    C, H, W, Ho, Wo, total, per_tile,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr, PIX: tl.constexpr,
):
    t = tl.program_id(0)
    c = tl.program_id(1)
    taps = tl.arange(0, TAPS)
    tmask = taps < KH * KW
    ti = taps // KW
    tj = taps % KW
    lo = t * per_tile
    hi = tl.minimum(lo + per_tile, total)
    how = Ho * Wo
    acc = tl.full([TAPS, PIX], 0.0, tl.float32)
    for start in range(lo, hi, PIX):
        j = start + tl.arange(0, PIX)
        jm = j < hi
        n = (j // how).to(tl.int64)
        p = j % how
        oh = p // Wo
        ow = p % Wo
        g = tl.load(gz_ptr + n * sgn + c * sgc + oh * sgh + ow * sgw, mask=jm,
                    other=0.0).to(tl.float32)
        ih = oh[None, :] * stride_h - pad_h + ti[:, None] * dil_h
        iw = ow[None, :] * stride_w - pad_w + tj[:, None] * dil_w
        m = jm[None, :] & tmask[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_ptr + n[None, :] * sxn + c * sxc + ih * sxh + iw * sxw, mask=m,
                     other=0.0).to(tl.float32)
        acc += xv * g[None, :]
    # Padded taps hold zeros; stage 2 never stores them.
    tl.store(part_ptr + (t.to(tl.int64) * C + c) * TAPS + taps, tl.reduce(acc, 1, _sum_combine))


@triton.jit
def _dw_weight_reduce_kernel(
    part_ptr, gw_ptr, C, num_tiles, sgwc, sgwh, sgww,
    KH: tl.constexpr, KW: tl.constexpr, TAPS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    c = tl.program_id(0)
    taps = tl.arange(0, TAPS)
    rows = tl.arange(0, BLOCK_T)
    acc = tl.full([BLOCK_T, TAPS], 0.0, tl.float32)
    # Fixed order over the tiles: the same inputs give bit-identical gradients.
    for t0 in range(0, num_tiles, BLOCK_T):
        t = t0 + rows
        acc += tl.load(part_ptr + ((t.to(tl.int64) * C + c) * TAPS)[:, None] + taps[None, :],
                       mask=(t < num_tiles)[:, None], other=0.0)
    total = tl.reduce(acc, 0, _sum_combine)
    ti = taps // KW
    tj = taps % KW
    tl.store(gw_ptr + c.to(tl.int64) * sgwc + ti * sgwh + tj * sgww,
             total.to(gw_ptr.dtype.element_ty), mask=taps < KH * KW)


def _geometry(
    input_size: Sequence[int], weight: Tensor, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int],
) -> Tuple[int, int, int, int, int, int, int, int, Tuple[int, ...]]:
    """Checks shapes; returns ``(N, C, H, W, Ho, Wo, kh, kw, geometry)``, ``geometry`` the
    kernels' flat (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)."""
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"slimops.kernels.depthwise_conv2d: weight must be [C_full, 1, kh, kw], "
                         f"got {tuple(weight.shape)}")
    if len(input_size) != 4:
        raise ValueError(f"slimops.kernels.depthwise_conv2d: input must be 4-D, got {tuple(input_size)}")
    n, c, h, w = (int(s) for s in input_size)
    if not 1 <= c <= weight.shape[0]:
        raise ValueError(f"slimops.kernels.depthwise_conv2d: input has {c} channels; expected "
                         f"between 1 and the weight's {weight.shape[0]}")
    ho, wo, spd = conv_geometry("depthwise_conv2d", h, w, weight.shape[2:], stride, padding,
                                dilation)
    return n, c, h, w, ho, wo, weight.shape[2], weight.shape[3], spd


def _forward_launch(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], residual: Optional[Tensor], out: Tensor, moments: Optional[Tensor],
    geo: Sequence[int], activation: int, t: Dict[str, int],
) -> Tuple[Tuple[int, ...], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of the forward's launch with tiling ``t``
    (``_forward_tiling``): the launcher's, and the AOT cases', which pass meta tensors of
    real shapes. ``out`` (and ``residual``) contiguous."""
    n, c, h, w = input.shape
    ho, wo = out.shape[2:]
    kh, kw = weight.shape[2:]
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w = geo
    grid = (n * c, t["strips"], t["row_groups"])
    args = (
        input, weight, input if bias is None else bias, input if scale is None else scale,
        input if shift is None else shift, input if residual is None else residual, out,
        out if moments is None else moments,
        c, h, w, ho, wo, t["row_tiles"], t["tiles_per_prog"],
        *input.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
        0 if bias is None else bias.stride(0), 0 if scale is None else scale.stride(0),
        0 if shift is None else shift.stride(0),
        stride_h, pad_h, dil_h,
    )
    kwargs = dict(
        KH=kh, KW=kw, SW=stride_w, PW=pad_w, DW=dil_w,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, HAS_RES=residual is not None, ACT=activation,
        V=t["V"], G=t["G"], ROWS=t["ROWS"], ALIGNED=t["ALIGNED"], OUT_V=t["OUT_V"],
        STATS=moments is not None, num_warps=t["num_warps"],
    )
    return grid, args, kwargs


def _forward(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], scale: Optional[Tensor],
    shift: Optional[Tensor], residual: Optional[Tensor], activation: int, stats: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    _check_activation(activation)
    check_device(input, weight, bias, scale, shift, residual)
    n, c, h, w, ho, wo, kh, kw, geo = _geometry(input.shape, weight, stride, padding, dilation)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"slimops.kernels.depthwise_conv2d: bias must be [{weight.shape[0]}], "
                         f"got {tuple(bias.shape)}")
    _check_vector(scale, c, "scale")
    _check_vector(shift, c, "shift")
    # Within an image the kernel offsets the input in 32 bits (image bases are int64).
    check_int32("depthwise_conv2d", input_image_span=image_span(input))
    out = torch.empty((n, c, ho, wo), dtype=input.dtype, device=input.device)
    if residual is not None:
        if tuple(residual.shape) != tuple(out.shape):
            raise ValueError(f"slimops.kernels.depthwise_conv2d: residual must be "
                             f"{tuple(out.shape)}, got {tuple(residual.shape)}")
        residual = residual.contiguous()  # an activation, not a weight: read like `out`
    t = _forward_tiling(input, ho, wo, kh * kw)
    tiles = t["strips"] * t["row_tiles"]
    moments = None
    if stats:
        # Moments layout: fp32 [3, N * tiles, C], row n * tiles + strip * row_tiles + row_tile
        # holds channel c's count / mean / M2 over that tile of image n (see
        # depthwise_conv2d_with_stats). Every row is written by the kernel: no zero fill.
        moments = torch.empty((3, n * tiles, c), dtype=torch.float32, device=input.device)
    if out.numel() == 0:
        return out, moments
    grid, args, kwargs = _forward_launch(input, weight, bias, scale, shift, residual, out,
                                         moments, geo, activation, t)
    traceable(_dw_forward_kernel)[grid](*args, **kwargs)
    return out, moments


def depthwise_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    activation: int,
) -> Tensor:
    """``slimops::depthwise_conv2d``: depthwise conv of ``input [N, C, H, W]`` with ``W[:C]``
    of ``weight [C_full, 1, kh, kw]`` (read in place through its strides) and the fused
    epilogue ``act((z + bias[c]) * scale[c] + shift[c] + residual)``.

    ``bias``: the full ``[C_full]`` bias or None (its prefix is used); ``scale``/``shift``:
    length ``C`` or None; ``residual``: ``[N, C, Ho, Wo]`` or None; ``activation``: 0 none,
    1 relu, 2 relu6. Returns a contiguous ``[N, C, Ho, Wo]`` tensor of the input's dtype.
    """
    return _forward(input, weight, bias, stride, padding, dilation, scale, shift, residual,
                    activation, False)[0]


def depthwise_conv2d_with_stats(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tuple[Tensor, Tensor]:
    """The forward of ``depthwise_conv2d`` (bias added, no other epilogue) returning
    ``(z, moments)``: ``moments`` is fp32 ``[3, N * tiles, C]``, planes count, mean and M2
    (sum of squared deviations from the row's mean), row ``n * tiles + k`` those of ``z``
    per channel over image ``n``'s ``k``-th output tile (``tiles = strips * row_tiles`` of
    ``_forward_tiling``; tile ``k = strip * row_tiles + row_tile`` covers ``ROWS`` output
    rows of one strip of ``G * V`` columns). The batch norm merges the rows
    (``batch_norm_act_from_partials``, ``count = N * Ho * Wo``). The statistics are those
    of ``z`` as stored (rounded to its dtype), in fp32, deterministically (no atomics).
    """
    z, moments = _forward(input, weight, bias, stride, padding, dilation, None, None,
                          None, ACT_NONE, True)
    return z, moments  # type: ignore[return-value]


def depthwise_conv2d_backward_input(
    grad_z: Tensor,
    weight: Tensor,
    input_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """``slimops::depthwise_conv2d_backward_input``: the gradient w.r.t. the input
    ``[N, C, H, W]`` (``input_size``) from the gradient of the conv output ``z`` (before the
    epilogue). Deterministic gather; ``W[:C]`` read in place."""
    check_device(grad_z, weight)
    n, c, h, w, ho, wo, kh, kw, geo = _geometry(input_size, weight, stride, padding, dilation)
    if tuple(grad_z.shape) != (n, c, ho, wo):
        raise ValueError(f"slimops.kernels.depthwise_conv2d_backward_input: grad_z must be "
                         f"{(n, c, ho, wo)}, got {tuple(grad_z.shape)}")
    check_int32("depthwise_conv2d_backward_input", grad_z_image_span=image_span(grad_z))
    grad_input = torch.empty((n, c, h, w), dtype=grad_z.dtype, device=grad_z.device)
    if grad_input.numel() == 0:
        return grad_input
    grid, args, kwargs = _backward_input_launch(grad_z, weight, grad_input, geo)
    traceable(_dw_backward_input_kernel)[grid](*args, **kwargs)
    return grad_input


def _backward_input_tiling(grad_z: Tensor, h: int, w: int, stride_w: int,
                           taps: int) -> Dict[str, int]:
    """The input gradient's tiling: the forward's (``_forward_tiling``) with ``grad_z`` as
    the rows read and ``cdiv(W, stride_w)`` window columns to cover (a lane's ``V`` window
    columns give ``stride_w * V`` gradient columns), ``V`` at most ``16 // stride_w`` (16
    fp32 accumulators per lane at most). ``OUT_V``: the widest power of two dividing W and
    the lane's store chunk."""
    t = _forward_tiling(grad_z, h, triton.cdiv(w, stride_w), taps,
                        max_v=1 << (max(1, 16 // stride_w).bit_length() - 1))
    out_v = 8
    while (stride_w * t["V"]) % out_v or w % out_v:
        out_v //= 2
    return dict(t, OUT_V=out_v)


def _backward_input_launch(
    grad_z: Tensor, weight: Tensor, grad_input: Tensor, geo: Sequence[int],
) -> Tuple[Tuple[int, ...], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of the input gradient's launch (contiguous ``grad_input``)."""
    n, c, h, w = grad_input.shape
    ho, wo = grad_z.shape[2:]
    kh, kw = weight.shape[2:]
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w = geo
    t = _backward_input_tiling(grad_z, h, w, stride_w, kh * kw)
    grid = (n * c, t["strips"], t["row_groups"])
    args = (grad_z, weight, grad_input, c, h, w, ho, wo, t["row_tiles"], t["tiles_per_prog"],
            *grad_z.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
            pad_h, dil_h)
    kwargs = dict(KH=kh, KW=kw, SH=stride_h, SW=stride_w, PW=pad_w, DW=dil_w, V=t["V"],
                  G=t["G"], ROWS=t["ROWS"], ALIGNED=t["ALIGNED"], OUT_V=t["OUT_V"],
                  num_warps=t["num_warps"])
    return grid, args, kwargs


def depthwise_conv2d_backward_weight(
    grad_z: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    """``slimops::depthwise_conv2d_backward_weight``: the gradient w.r.t. the full weight
    (its shape and dtype): ``[:C]`` filled, the channels past the active width zero, so
    autograd accumulates it as is. Deterministic two-stage reduction, fp32 partials."""
    check_device(grad_z, input, weight)
    n, c, h, w, ho, wo, kh, kw, geo = _geometry(input.shape, weight, stride, padding, dilation)
    if tuple(grad_z.shape) != (n, c, ho, wo):
        raise ValueError(f"slimops.kernels.depthwise_conv2d_backward_weight: grad_z must be "
                         f"{(n, c, ho, wo)}, got {tuple(grad_z.shape)}")
    grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    total = n * ho * wo
    # The partials kernel walks the batch's output pixels as one 32-bit index and offsets
    # within an image in 32 bits.
    check_int32("depthwise_conv2d_backward_weight", output_pixels=total,
                grad_z_image_span=image_span(grad_z), input_image_span=image_span(input))
    if total == 0:
        return grad_weight
    num_tiles, taps, pix, per_tile = _weight_split(grad_z, kh, kw, split_tiles)
    partials = torch.empty((num_tiles, c, taps), dtype=torch.float32, device=input.device)
    for kernel, (grid, args, kwargs) in (
        (_dw_weight_partials_kernel,
         _weight_partials_launch(grad_z, input, partials, kh, kw, geo, pix, per_tile)),
        (_dw_weight_reduce_kernel, _weight_reduce_launch(partials, grad_weight)),
    ):
        traceable(kernel)[grid](*args, **kwargs)
    return grad_weight


def _weight_split(grad_z: Tensor, kh: int, kw: int, split: Any) -> Tuple[int, int, int, int]:
    """``(num_tiles, taps, pix, per_tile)`` of the weight gradient: the partials' tiles
    (``split(total, C, pix, device)``: ``split_tiles``, or the AOT cases' GPU split), the
    taps padded to a power of two and the pixels per loop step."""
    n, c, ho, wo = grad_z.shape
    taps = _taps_p2(kh, kw)
    pix = max(16, _pick(ho * wo)["WTILE"] // taps)
    num_tiles, per_tile = split(n * ho * wo, c, pix, grad_z.device)
    return num_tiles, taps, pix, per_tile


def _weight_partials_launch(
    grad_z: Tensor, input: Tensor, partials: Tensor, kh: int, kw: int, geo: Sequence[int],
    pix: int, per_tile: int,
) -> Tuple[Tuple[int, ...], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of stage 1 of the weight gradient (fp32 ``partials``
    ``[num_tiles, C, taps]``)."""
    n, c, h, w = input.shape
    ho, wo = grad_z.shape[2:]
    num_tiles, _, taps = partials.shape
    args = (grad_z, input, partials, c, h, w, ho, wo, n * ho * wo, per_tile,
            *grad_z.stride(), *input.stride(), *geo)
    kwargs = dict(KH=kh, KW=kw, TAPS=taps, PIX=pix, num_warps=_pick(ho * wo)["num_warps"])
    return (num_tiles, c), args, kwargs


def _weight_reduce_launch(
    partials: Tensor, grad_weight: Tensor,
) -> Tuple[Tuple[int, ...], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of stage 2: the partials summed into ``grad_weight``."""
    num_tiles, c, taps = partials.shape
    args = (partials, grad_weight, c, num_tiles, grad_weight.stride(0), grad_weight.stride(2),
            grad_weight.stride(3))
    kwargs = dict(KH=grad_weight.shape[2], KW=grad_weight.shape[3], TAPS=taps,
                  BLOCK_T=REDUCE_BLOCK_T, num_warps=1)
    return (c,), args, kwargs


# The shapes the AOT cases are built at: name -> (batch, C, H = W, stride), S-MobileNet v2
# (width 1.0, 224x224) depthwise layers unless noted; each is compiled for 3x3 and 5x5
# (``AOT_KERNEL_SIZES``, padding k // 2).
AOT_SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "56_s1": (32, 144, 56, 1),  # rows aligned: vector loads
    "112_s2": (32, 96, 112, 2),  # aligned, stride 2
    "7_s1": (32, 960, 7, 1),  # W = 7: not aligned, per-element loads
    # not a MobileNet v2 shape (its stride-2 inputs are all even): an odd-width stride-2
    # input, the unaligned stride-2 forward
    "15_s2": (32, 96, 15, 2),
    "56_s1_b1": (1, 144, 56, 1),  # batch 1 (inference): several row tiles per program
    "112_s1": (32, 32, 112, 1),  # the first block's depthwise (input gradient entry 2)
    # not a 224x224 shape: a 320x320 plane (a 640x640 input, as detection backbones take),
    # the input gradient's and weight partials' largest entry (planes > 65536 pixels)
    "320_s1": (1, 32, 320, 1),
    # the 14x14 -> 7x7 stride-2 depthwise: grad_z 7 wide, the unaligned strided input gradient
    "14_s2": (32, 576, 14, 2),
}
# Forward: (shape, epilogue modes); the input gradient and the weight gradient (both
# stages): one shape per tuning entry (``_pick`` by plane size: 7, 56, 112, 320).
AOT_FORWARD = [("56_s1", ("plain", "full", "stats")), ("112_s2", ("plain", "full", "stats")),
               ("7_s1", ("plain", "full", "stats")), ("15_s2", ("plain", "full", "stats")),
               ("56_s1_b1", ("full",))]
AOT_BACKWARD = ["7_s1", "56_s1", "112_s1", "320_s1"]
# The input gradient: also stride 2, grad_z rows aligned (112 -> 56) and not (14 -> 7).
AOT_BACKWARD_INPUT = AOT_BACKWARD + ["112_s2", "14_s2"]
# Resident blocks per SM each kernel's AOT cases must keep (regression floors under the
# JIT-exact figures of docs/GPU_KERNELS.md: forward 11-32, input gradient 8-32, partials
# 5-25, reduction 32).
AOT_MIN_OCCUPANCY = {"_dw_forward_kernel": 8, "_dw_backward_input_kernel": 8,
                     "_dw_weight_partials_kernel": 4, "_dw_weight_reduce_kernel": 16}


def _aot_tensors(shape: str, k: int, dtype: torch.dtype, device: str) -> Tuple[Any, ...]:
    """``(x, weight, vec, z, geo)`` of an AOT shape: input, full weight, a per-channel
    vector, a tensor of the output's shape, the flat geometry."""
    n, c, h, s = AOT_SHAPES[shape]
    p = k // 2
    ho = (h + 2 * p - k) // s + 1
    return (torch.empty((n, c, h, h), dtype=dtype, device=device),
            torch.empty((c, 1, k, k), dtype=dtype, device=device),
            torch.empty((c,), dtype=dtype, device=device),
            torch.empty((n, c, ho, ho), dtype=dtype, device=device), (s, s, p, p, 1, 1))


def _aot_call(kind: str, shape: str, k: int, dtype: torch.dtype, mode: str) -> None:
    """The public launcher of an AOT case, on CPU tensors."""
    x, w, vec, z, geo = _aot_tensors(shape, k, dtype, "cpu")
    s, p, d = geo[0:2], geo[2:4], geo[4:6]
    if kind == "forward" and mode == "stats":
        depthwise_conv2d_with_stats(x, w, vec, s, p, d)
    elif kind == "forward":
        full = mode == "full"
        depthwise_conv2d(x, w, vec if full else None, s, p, d, vec if full else None,
                         vec if full else None, z if full else None,
                         ACT_RELU6 if full else ACT_NONE)
    elif kind == "backward_input":
        depthwise_conv2d_backward_input(z, w, list(x.shape), s, p, d)
    else:
        depthwise_conv2d_backward_weight(z, x, w, s, p, d)


def aot_cases() -> List[AotCase]:
    """The binaries the launchers compile at ``AOT_SHAPES``, specialised exactly as triton's
    JIT specialises their launches (``launch_case`` on the launch builders' argument lists,
    meta tensors of the real shapes; the weight gradient split for an H100, as
    ``split_tiles`` does there): per dtype and kernel size (3x3, 5x5) the forward at
    ``AOT_FORWARD`` (aligned and not, strides 1 and 2; without epilogue, with the full one
    -- bias, scale, shift, residual, relu6 -- and with STATS), the input gradient and the
    weight gradient's two stages at ``AOT_BACKWARD`` (every tuning entry). ``meta["call"]``
    runs the launcher on CPU tensors."""
    cases: List[AotCase] = []

    def split(total: int, c: int, block: int, device: Any) -> Tuple[int, int]:
        return split_tiles(total, c, block, None, AOT_TARGET_PROGRAMS)

    for dtype in DTYPES:
        tag = str(dtype).split(".")[-1]
        for k in AOT_KERNEL_SIZES:
            for shape, modes in AOT_FORWARD:
                x, w, vec, z, geo = _aot_tensors(shape, k, dtype, "meta")
                t = _forward_tiling(x, z.shape[2], z.shape[3], k * k)
                for mode in modes:
                    full, stats = mode == "full", mode == "stats"
                    moments = None
                    if stats:
                        moments = meta_tensor(
                            (3, x.shape[0] * t["strips"] * t["row_tiles"], x.shape[1]),
                            torch.float32)
                    launch = _forward_launch(
                        x, w, None if mode == "plain" else vec, vec if full else None,
                        vec if full else None, z if full else None, z, moments, geo,
                        ACT_RELU6 if full else ACT_NONE, t)
                    cases.append(launch_case(
                        f"dw_forward_{tag}_k{k}_s{geo[0]}_"
                        f"{'v' if t['ALIGNED'] else 'u'}{t['V']}_{mode}"
                        f"{'_b1' if shape.endswith('_b1') else ''}",
                        _dw_forward_kernel, launch,
                        meta=dict(kind="forward", shape=shape, k=k, dtype=dtype, mode=mode,
                                  call=functools.partial(_aot_call, "forward", shape, k,
                                                         dtype, mode))))
            for shape in AOT_BACKWARD_INPUT:
                x, w, vec, z, geo = _aot_tensors(shape, k, dtype, "meta")
                launch = _backward_input_launch(z, w, x, geo)
                aligned = "v" if launch[2]["ALIGNED"] else "u"
                cases.append(launch_case(
                    f"dw_backward_input_{tag}_k{k}_{shape}_{aligned}{launch[2]['V']}",
                    _dw_backward_input_kernel, launch,
                    meta=dict(shape=shape, k=k, dtype=dtype, kind="backward_input",
                              call=functools.partial(_aot_call, "backward_input", shape, k,
                                                     dtype, ""))))
            for shape in AOT_BACKWARD:
                x, w, vec, z, geo = _aot_tensors(shape, k, dtype, "meta")
                meta = dict(shape=shape, k=k, dtype=dtype,
                            config=CONFIGS.index(_pick(x.shape[2] * x.shape[3])))
                num_tiles, taps, pix, per_tile = _weight_split(z, k, k, split)
                partials = meta_tensor((num_tiles, x.shape[1], taps), torch.float32)
                call = functools.partial(_aot_call, "backward_weight", shape, k, dtype, "")
                cfg = _pick(z.shape[2] * z.shape[3])
                cases.append(launch_case(
                    f"dw_weight_partials_{tag}_k{k}_t{cfg['WTILE']}_w{cfg['num_warps']}",
                    _dw_weight_partials_kernel,
                    _weight_partials_launch(z, x, partials, k, k, geo, pix, per_tile),
                    meta=dict(meta, kind="weight_partials", call=call)))
                if shape == "56_s1":
                    cases.append(launch_case(
                        f"dw_weight_reduce_{tag}_k{k}", _dw_weight_reduce_kernel,
                        _weight_reduce_launch(partials, w),
                        meta=dict(meta, kind="weight_reduce", call=call)))
    return with_floors(cases, AOT_MIN_OCCUPANCY)


__all__ = [
    "CONFIGS",
    "aot_cases",
    "depthwise_conv2d",
    "depthwise_conv2d_backward_input",
    "depthwise_conv2d_backward_weight",
    "depthwise_conv2d_with_stats",
]
