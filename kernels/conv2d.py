"""Triton kernels of the slimmable (grouped) convolution, its two backward ops, and the
forward with per-channel statistics for switchable batch norm in training.

Weights: the full ``[G * Og, Ig, kh, kw]`` tensor. Group ``g`` uses the first
``og = out_channels // G`` rows of its block of ``Og`` rows and the first ``ig = C_in // G``
input channels (per-group prefixes, ``slimops.reference.conv2d``). Every kernel addresses
row ``g * Og + o`` through the full tensor's strides: the active weight is never sliced into
a contiguous copy, which is what slimops exists to avoid.

All three convolutions are implicit GEMMs with the activation operand gathered on the fly
through its strides (padding and, for the input gradient, stride divisibility as load masks);
``kh``/``kw``, stride, padding and dilation are run-time arguments, so one binary serves every
geometry. K is walked tap by tap, a block of channels at a time, so the gather's address and
mask are a per-pixel vector plus a per-channel vector:

=========================  ========================  =====================  ===================
kernel                     M                         N                      K
=========================  ========================  =====================  ===================
forward (+ stats)          Ho * Wo pixels per image  og output channels     kh * kw * ig
input gradient             H * W pixels per image    ig input channels      kh * kw * og
weight gradient            og output channels        ig (one tap/program)   (image, pixel tile)
=========================  ========================  =====================  ===================

Memory layout is what these kernels are about (the layers are memory-bound, see
docs/GPU_KERNELS.md):

* **M tiles stay inside one image** (M tile = (image, pixel tile)), and the plane size
  ``HW`` is an argument: the tile's pixels are ``BLOCK_M`` consecutive, aligned indices
  (``tl.max_contiguous``/``tl.multiple_of``), and with the JIT's divisibility hint on ``HW``
  (planes of 56x56, 28x28: multiples of 16) the compiler can prove NCHW addresses contiguous
  and 16-byte aligned: vectorised, ``cp.async``-pipelined operand copies and 128-bit stores.
  A flat ``N * Ho * Wo`` index (``n = m // HW``) hid that unless ``Ho``, ``Wo`` were multiples
  of 16.
* **1x1 GEMM path** (``IS_1X1``: 1x1 kernel, stride 1, no padding, dense planes): output
  pixel p reads input pixel p, a plain GEMM operand with no gather arithmetic; ``EVEN_K``
  (channels a multiple of ``BLOCK_K``) drops the channel mask so the weight's K-contiguous
  rows vectorise as well.
* **NCHW or NHWC** (channels_last) in and out: every activation is addressed through its
  strides (output pixel p at the plane's pixel stride), and the launchers give the output the
  input's memory format. The JIT turns the unit stride into a constant, so each layout gets
  its own binary: contiguous along the pixels for NCHW, along the channels for NHWC.
* **Grouped launch order**: the forward and input-gradient grids enumerate (M tile, N tile)
  in groups of ``GROUP_M`` M tiles that sweep all N tiles before the next group, so a group's
  activation tiles and the weight stay in L2 together; the convolution group is grid axis 1.
  The weight gradient takes the same order over (output-channel tile, (input-channel block,
  tap)) with the tap fastest, so consecutive programs gather the same input planes, laid on
  its grid's three axes (``_weight_tile``).

* The forward fuses ``act((z + bias[c]) * scale[c] + shift[c] + residual)``, each term under a
  constexpr flag so an absent term costs nothing. With ``STATS`` it also stores, per
  output channel, the moments (count, mean, M2) of its tile's (bias-added) outputs into row
  ``pid_m`` (image-major: ``n * tiles_per_image + pixel tile``) of an fp32
  ``[3, num_m_tiles, out_channels]`` buffer: deterministic, no atomics; the batch norm's
  merge tree combines the rows.
* The weight gradient's K (every output pixel of the batch) is long and its M x N small at
  narrow widths, so K is split over programs that write fp32 partials, summed in a fixed
  order afterwards (deterministic); with one split the kernel writes the weight's dtype
  straight into the prefix of the zero-initialised full-size gradient.

Accumulation is fp32 for every dtype; outputs are in the input's dtype. fp32 operands use
TF32 tensor cores exactly when ``torch.backends.cudnn.allow_tf32`` allows it for
``F.conv2d`` (on by default), through the ``ALLOW_TF32`` constexpr.
"""

from __future__ import annotations

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
    interpreting,
    traceable,
)
from slimops.kernels.batch_norm_act import store_tile_moments
from slimops.kernels.epilogue import (
    DTYPES,
    _activate,
    _check_activation,
    _sm_count,
    compiled,
)

# Implicit-GEMM tiles, per operand width. M tiles stay inside one image, so BLOCK_M is chosen
# from the image's pixel count (``_pick``): a tile much larger than the image would waste
# lanes on every image. fp16/bf16 take BLOCK_K = 32 (two k16 MMA steps and 64-byte rows of the
# gathered operand per load), fp32 BLOCK_K = 16 for the large tiles (the same bytes per row;
# its IEEE/FMA dot path needs the registers). Every entry compiles for sm_80 and sm_90 with no
# spills, at most 128 registers and at least its occupancy floor, in every dtype and flag set,
# exactly as the JIT specialises it at S-MobileNet v2 shapes (tests/kernels/test_aot.py,
# tests/kernels/test_kernels_compiled.py).
# Entry 3 serves gathered operands (the general path, NHWC, planes that are not a multiple of
# 16 pixels): their scalar loads keep one pointer and mask per element in registers, which
# on 4 warps took 159-187 registers (64 x 64 and 128 x 64 tiles, fp16, sm_80); 8 warps on a
# 64 x 64 tile halve that share (111-120). fp32 takes 2 stages there: with 3, ptxas left an
# 8-16 byte stack frame in the dense 3x3 gradients.
CONFIGS: List[Dict[str, int]] = [
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
]
CONFIGS_FP32: List[Dict[str, int]] = [
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 2},
]
# Grouped launch order: GROUP_M consecutive M tiles (pixel tiles; the weight gradient's
# output-channel tiles) sweep every N tile before the next group starts, so a group's
# operand tiles stay in L2 together while the N tiles stream past.
GROUP_M = 8


def configs(dtype: torch.dtype) -> List[Dict[str, int]]:
    """The tuning list of ``dtype``'s kernels."""
    return CONFIGS_FP32 if dtype == torch.float32 else CONFIGS


def _pick(pixels: int, n: int, dtype: torch.dtype, streamed: bool = True) -> Dict[str, int]:
    """The tuning entry for a GEMM whose M tiles cover ``pixels`` pixels of one image (or, for
    the weight gradient, ``pixels`` output channels) and whose N is ``n`` (per group). The
    interpreter always gets the smallest: its cost is per program op, and small tiles make the
    tests cover several M tiles per image (the statistics' partial rows) and several K
    iterations. ``streamed``: the activation operands are contiguous, aligned pixel runs
    (``_streamed``), else they are gathered element by element (entry 3)."""
    return configs(dtype)[0] if interpreting() else _pick_gpu(pixels, n, dtype, streamed)


def _pick_gpu(pixels: int, n: int, dtype: torch.dtype, streamed: bool = True) -> Dict[str, int]:
    """``_pick`` on a GPU (the AOT cases use it under the interpreter too)."""
    table = configs(dtype)
    if n <= 32 or pixels <= 32:
        return table[0]
    if not streamed:
        return table[3]
    if pixels >= 1024 and n >= 64:
        return table[2]
    return table[1]


@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr):
    # input_precision only matters for fp32 operands: "ieee" is exact fp32 (FMA path).
    if ALLOW_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _gemm_k_loop(a_rows, sak, b_cols, sbk, K, mmask, nmask, acc, EVEN_K: tl.constexpr,
                 BLOCK_K: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """The 1x1 path's K loop, shared by the forward and the input gradient:
    ``acc += A[rows, :K] @ B[:K, cols]`` with A's row ``m`` at ``a_rows[m]`` and its k-th
    element ``sak`` further, B's column ``n`` at ``b_cols[n]`` and its k-th element ``sbk``
    further. ``EVEN_K`` (K a multiple of ``BLOCK_K``) drops the K mask, which keeps B's
    K-contiguous rows vectorisable."""
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            a = tl.load(a_rows[:, None] + (k * sak)[None, :], mask=mmask[:, None], other=0.0)
            b = tl.load(b_cols[None, :] + (k * sbk)[:, None], mask=nmask[None, :], other=0.0)
        else:
            kmask = k < K
            a = tl.load(a_rows[:, None] + (k * sak)[None, :],
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_cols[None, :] + (k * sbk)[:, None],
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = _dot(a, b, acc, ALLOW_TF32)
    return acc


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in the grouped (L2-swizzled) order: groups of
    GROUP_M M tiles, each walked column by column over the N tiles."""
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _weight_tile(pid_x, pid_y, pid_z, m_group, num_mg, taps, num_groups):
    """``(pid_m, t, pid_n, g, split)`` of the weight gradient's program ``(pid_x, pid_y,
    pid_z)``: output-channel tile ``pid_m``, tap ``t``, input-channel block ``pid_n``,
    convolution group ``g``, K split ``split``. The grid is ``(m_group, taps * c_blocks,
    num_mg * groups * splits)``, so in launch order (x fastest) groups of ``m_group`` (=
    ``min(GROUP_M, num_m)``) output-channel tiles sweep every (channel block, tap) tile
    before the next group (``num_mg`` groups; the last one's programs past ``num_m`` have no
    tile), then the next (group, split).

    Why this order: every program of a split streams the same K range (the split's pixels),
    reading grad_z's rows of its output-channel tile (A) and the input's channel block
    gathered at its tap (B). A is shared by every N tile of one ``pid_m``, B by every M tile
    of one (tap, channel block), and the taps of one channel block gather nearly the same
    input pixels (windows shifted by a dilation step), so B's data is shared by all ``taps``
    of a block. N therefore enumerates the taps fastest within a channel block (consecutive
    N tiles re-read one block of input planes through L2), and groups of ``GROUP_M``
    output-channel tiles sweep the N tiles, as ``_grouped_tile`` orders the forward: the
    programs resident at once cover at most ``GROUP_M`` blocks of grad_z rows and few input
    channel blocks. With ``num_m <= GROUP_M`` (og <= 8 * BLOCK_M: most layers) the order is
    the row-major one over (M, N), M fastest, as before, but for the taps' order. Only which
    program computes which tile changes; each tile's reduction (and the partials' sum) is as
    it was. The grouping rides on the grid's axes rather than on a decoded flat program id
    (``_grouped_tile``): ptxas re-reads program ids where it would keep decoded indices live
    across the K loop, which cost the fp32 IEEE 3x3 binary 13 registers on sm_80 (141 > 128)
    and a 16-byte stack frame on sm_90."""
    pid_n = pid_y // taps
    t = pid_y - pid_n * taps
    mg = pid_z % num_mg
    rest = pid_z // num_mg
    g = rest % num_groups
    split = rest // num_groups
    return mg * m_group + pid_x, t, pid_n, g, split


@triton.jit
def _pixel_tile(pid_m, tiles, BLOCK_M: tl.constexpr):
    """Image ``n`` and pixel indices ``p`` (row-major within the image) of M tile ``pid_m``:
    M tiles never straddle two images, so ``p`` is ``BLOCK_M`` consecutive, ``BLOCK_M``-aligned
    pixels (the hints say so), and with a unit pixel stride the tile's addresses are
    contiguous: with the plane size a multiple of 16 (the JIT's divisibility hint on ``HW``),
    aligned as well, which lets the compiler vectorise and pipeline (cp.async) the accesses."""
    n = pid_m // tiles
    p = (pid_m - n * tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.max_contiguous(tl.multiple_of(p, BLOCK_M), BLOCK_M)
    return n, p


@triton.jit
def _conv_forward_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, moments_ptr,
    H, W, Wo, HWo, tiles, num_m, og, ig, rows_per_group, KH, KW, C_out,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, son, soc, sop,
    bias_stride, scale_stride, shift_stride,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr, ALLOW_TF32: tl.constexpr,
    IS_1X1: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    g = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_m, (og + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    # M: output pixels p of image n (one image per tile).
    n, p = _pixel_tile(pid_m, tiles, BLOCK_M)
    mmask = p < HWo
    # int64 image bases (a batch can pass 2^31 elements); offsets inside an image are int32.
    x_img = x_ptr + n.to(tl.int64) * sxn + (g * ig).to(tl.int64) * sxc
    # N: output channels o < og of group g, i.e. weight rows g * Og + o of the full tensor.
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < og
    w_cols = w_ptr + (g * rows_per_group + rn).to(tl.int64) * swo
    rk = tl.arange(0, BLOCK_K)
    # tl.full / tl.reduce(_sum_combine) rather than tl.zeros / tl.sum, and no tl.cdiv: those
    # are jit functions that, under TRITON_INTERPRET=1, stay interpreted and break the AOT
    # compile of these kernels (see slimops.kernels.epilogue._sum_combine).
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    if IS_1X1:
        # 1x1, stride 1, no padding, dense planes: output pixel p reads input pixel p, so the
        # activation tile is a plain [pixels, channels] GEMM operand (contiguous along the
        # pixels for NCHW, along the channels for NHWC). EVEN_K (ig a multiple of BLOCK_K)
        # drops the channel mask, which keeps the weight's K-contiguous rows vectorisable.
        acc = _gemm_k_loop(x_img + p * sxw, sxc, w_cols, swi, ig, mmask, nmask, acc,
                           EVEN_K, BLOCK_K, ALLOW_TF32)
    else:
        oh = p // Wo
        ow = p - oh * Wo
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        # K = (tap, input channel), walked as one flat loop over (tap, channel block): the
        # tap's padding mask and input address are per row ([BLOCK_M] vectors, scalar div/mod
        # per iteration), and the channel offset a broadcast add, which keeps the gather cheap
        # in integer ops and registers. A channel block is padded when ig is not a multiple of
        # BLOCK_K (the first layer's 3 channels).
        c_blocks = (ig + BLOCK_K - 1) // BLOCK_K
        for it in range(0, KH * KW * c_blocks):
            t = it // c_blocks
            ci = (it - t * c_blocks) * BLOCK_K + rk
            kh = t // KW
            kw = t - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            rmask = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            cmask = ci < ig
            a = tl.load((x_img + ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0)
            b = tl.load((w_cols + kh * swh + kw * sww)[None, :] + (ci * swi)[:, None],
                        mask=cmask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)
    if HAS_BIAS:
        # The bias follows the weight's rows (full-size bias, per-group prefix).
        bias = tl.load(bias_ptr + (g * rows_per_group + rn) * bias_stride, mask=nmask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c = g * og + rn  # output channel
    mask = mmask[:, None] & nmask[None, :]
    if STATS:
        # The tile's per-channel moments (count, mean, M2) into row pid_m, of the stored
        # values (rounded to the output dtype), so batch norm normalises with the moments
        # of the tensor it reads.
        store_tile_moments(moments_ptr, pid_m, num_m, C_out, c, nmask,
                           acc.to(out_ptr.dtype.element_ty), mmask)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + c * scale_stride, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + c * shift_stride, mask=nmask, other=0.0).to(tl.float32)[None, :]
    # out (and residual, which the launcher gives the output's strides): image n at son, an
    # int32 offset tile inside it (pixel p at sop, channel c at soc: NCHW or NHWC). One offset
    # tile serves both, which keeps the full epilogue from spilling.
    img = n.to(tl.int64) * son
    o_offs = (p * sop)[:, None] + (c * soc)[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + img + o_offs, mask=mask, other=0.0).to(tl.float32)
    acc = _activate(acc, ACT)
    tl.store(out_ptr + img + o_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_backward_input_kernel(
    gz_ptr, w_ptr, gx_ptr,
    H, W, Ho, Wo, HW, tiles, num_m, og, ig, rows_per_group, KH, KW,
    sgn, sgc, sgh, sgw, swo, swi, swh, sww, sxn, sxc, sxp,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ALLOW_TF32: tl.constexpr, IS_1X1: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    g = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_m, (ig + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    # M: input pixels p of image n.
    n, p = _pixel_tile(pid_m, tiles, BLOCK_M)
    mmask = p < HW
    g_img = gz_ptr + n.to(tl.int64) * sgn + (g * og).to(tl.int64) * sgc
    # N: input channels ci < ig of group g.
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < ig
    w_cols = w_ptr + (g * rows_per_group).to(tl.int64) * swo + rn * swi
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    if IS_1X1:
        # 1x1, stride 1, no padding: input pixel p is read by output pixel p only, a GEMM of
        # grad_z's [pixels, og] tile with the weight's [og, ig] block.
        acc = _gemm_k_loop(g_img + p * sgw, sgc, w_cols, swo, og, mmask, nmask, acc,
                           EVEN_K, BLOCK_K, ALLOW_TF32)
    else:
        ih = p // W
        iw = p - ih * W
        # K = (tap, output channel), one flat loop over (tap, channel block) as in the forward.
        o_blocks = (og + BLOCK_K - 1) // BLOCK_K
        for it in range(0, KH * KW * o_blocks):
            t = it // o_blocks
            o = (it - t * o_blocks) * BLOCK_K + rk
            kh = t // KW
            kw = t - kh * KW
            # Input pixel ih is read by tap kh of output row oh iff oh * stride - pad + kh * dil
            # == ih: the offset must be a non-negative multiple of the stride. Clamping before
            # the division keeps // and % on non-negative operands (floor == truncation).
            th = ih + pad_h - kh * dil_h
            tw = iw + pad_w - kw * dil_w
            thc = tl.maximum(th, 0)
            twc = tl.maximum(tw, 0)
            oh = thc // stride_h
            ow = twc // stride_w
            rmask = (mmask & (th >= 0) & (tw >= 0) & (thc - oh * stride_h == 0)
                     & (twc - ow * stride_w == 0) & (oh < Ho) & (ow < Wo))
            omask = o < og
            a = tl.load((g_img + oh * sgh + ow * sgw)[:, None] + (o * sgc)[None, :],
                        mask=rmask[:, None] & omask[None, :], other=0.0)
            b = tl.load((w_cols + kh * swh + kw * sww)[None, :] + (o * swo)[:, None],
                        mask=omask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)
    # grad_input [N, C_in, H, W] in the launcher's memory format (pixel p at sxp, channel at
    # sxc); every input channel belongs to one group.
    c = g * ig + rn
    img = gx_ptr + n.to(tl.int64) * sxn
    tl.store(img + ((p * sxp)[:, None] + (c * sxc)[None, :]), acc.to(gx_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _conv_backward_weight_kernel(
    gz_ptr, x_ptr, gw_ptr,
    H, W, Wo, HWo, tiles, k_tiles, per_split, og, ig, KW, taps, m_group, num_mg, num_groups,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    sws, swg, swo, swi, swh, sww,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ALLOW_TF32: tl.constexpr, IS_1X1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The grouped order over (output-channel tile, (input channel block, tap)) on the grid's
    # axes (_weight_tile); one tap per program, so the input gather's address is a
    # per-pixel vector plus a per-channel vector.
    pid_m, t, pid_n, g, split = _weight_tile(tl.program_id(0), tl.program_id(1),
                                             tl.program_id(2), m_group, num_mg, taps,
                                             num_groups)
    kh = t // KW
    kw = t - kh * KW
    # M: output channels o < og of group g (int32 offsets inside an image).
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < og
    g_offs = (g * og + rm) * sgc
    # N: input channels ci < ig of group g.
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ci < ig
    x_offs = (g * ig + ci) * sxc
    # K: this split's fixed range of K tiles; K tile kt is the pixel tile kt % tiles of image
    # kt // tiles (tiles never straddle two images, as in the forward).
    lo = split * per_split
    # (a program past the last output-channel tile, in the last group: no K tile, no store)
    hi = tl.where(pid_m * BLOCK_M < og, tl.minimum(lo + per_split, k_tiles), lo)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for kt in range(lo, hi):
        n, q = _pixel_tile(kt, tiles, BLOCK_K)
        kmask = q < HWo
        gz_img = gz_ptr + n.to(tl.int64) * sgn
        x_img = x_ptr + n.to(tl.int64) * sxn
        if IS_1X1:
            # 1x1, stride 1, no padding: output pixel q reads input pixel q.
            a = tl.load(gz_img + g_offs[:, None] + (q * sgw)[None, :],
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(x_img + (q * sxw)[:, None] + x_offs[None, :],
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
        else:
            oh = q // Wo
            ow = q - oh * Wo
            a = tl.load(gz_img + g_offs[:, None] + (oh * sgh + ow * sgw)[None, :],
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            kvalid = kmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b = tl.load(x_img + (ih * sxh + iw * sxw)[:, None] + x_offs[None, :],
                        mask=kvalid[:, None] & nmask[None, :], other=0.0)
        acc = _dot(a, b, acc, ALLOW_TF32)
    # gw: the full weight (swg = Og rows) or this split's fp32 partial [G, og, ig, kh, kw].
    w_rows = (gw_ptr + split.to(tl.int64) * sws + g.to(tl.int64) * swg
              + rm.to(tl.int64) * swo + kh * swh + kw * sww)
    tl.store(w_rows[:, None] + (ci * swi)[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------- launchers


def _allow_tf32(dtype: torch.dtype) -> bool:
    # F.conv2d on CUDA follows cuDNN's switch (TF32 on by default for convolutions).
    return dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32)


def _check_dtypes(ref: Tensor, *tensors: Optional[Tensor]) -> None:
    if ref.dtype not in DTYPES:
        raise TypeError(f"slimops.kernels.conv2d: unsupported dtype {ref.dtype}; expected one of "
                        f"{DTYPES}")
    for t in tensors:
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"slimops.kernels.conv2d: dtype mismatch: {t.dtype} vs {ref.dtype}")


def _geometry(
    input_size: Sequence[int], weight: Tensor, out_channels: int, stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> Tuple[int, int, int, int, int, int, int, int, Tuple[int, ...]]:
    """Checks shapes; returns ``(N, H, W, Ho, Wo, og, ig, Og, geometry)``, ``geometry`` the
    kernels' flat (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)."""
    if weight.dim() != 4:
        raise ValueError(f"slimops.kernels.conv2d: weight must be 4-D, got {tuple(weight.shape)}")
    if len(input_size) != 4:
        raise ValueError(f"slimops.kernels.conv2d: input must be 4-D, got {tuple(input_size)}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"slimops.kernels.conv2d: groups={groups} must divide the weight's "
                         f"{weight.shape[0]} rows")
    n, c_in, h, w = (int(s) for s in input_size)
    rows_per_group = weight.shape[0] // groups
    if out_channels < 1 or out_channels % groups or out_channels // groups > rows_per_group:
        raise ValueError(f"slimops.kernels.conv2d: out_channels={out_channels} must be a positive "
                         f"multiple of groups={groups} and at most {weight.shape[0]}")
    if c_in < 1 or c_in % groups or c_in // groups > weight.shape[1]:
        raise ValueError(f"slimops.kernels.conv2d: {c_in} input channels must be a positive "
                         f"multiple of groups={groups} and at most {groups * weight.shape[1]}")
    ho, wo, spd = conv_geometry("conv2d", h, w, weight.shape[2:], stride, padding, dilation)
    # offsets inside one image are int32 (kernels/conv2d.py's kernels, see their comments)
    check_int32("conv2d", input_image_elements=c_in * h * w,
                output_image_elements=out_channels * ho * wo)
    return n, h, w, ho, wo, out_channels // groups, c_in // groups, rows_per_group, spd


def _vector(v: Optional[Tensor], length: int, name: str) -> None:
    if v is not None and (v.dim() != 1 or v.shape[0] != length):
        raise ValueError(f"slimops.kernels.conv2d: {name} must be a vector of length {length}, "
                         f"got {tuple(v.shape)}")


def memory_format(t: Tensor) -> torch.memory_format:
    """``torch.channels_last`` when ``t`` (4-D) is channels_last and not plain contiguous (a
    tensor can be both, e.g. 1x1 planes): the launchers give their outputs the memory format
    of the activation they read, so an NHWC network stays NHWC without copies."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense_plane(t: Tensor) -> bool:
    """Pixel ``p = h * W + w`` of every plane of ``t`` (4-D) sits at ``p * t.stride(3)``."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _gemm_1x1(weight: Tensor, geo: Sequence[int], *activations: Tensor) -> bool:
    """The kernels' ``IS_1X1`` path applies: a 1x1 kernel, stride 1, no padding (dilation is
    then irrelevant), and dense planes in the activations it reads, so output pixel p reads
    input pixel p at one stride."""
    return (tuple(weight.shape[2:]) == (1, 1) and tuple(geo[:4]) == (1, 1, 0, 0)
            and all(_dense_plane(t) for t in activations))


def _streamed(weight: Tensor, geo: Sequence[int], hw: int, *activations: Tensor) -> bool:
    """The activation operands are contiguous runs of pixels the compiler can prove 16-byte
    aligned: the 1x1 path, unit pixel strides (NCHW) and planes of a multiple of 16 pixels
    (the JIT's divisibility hint). Such operands are copied with cp.async, not gathered."""
    return (_gemm_1x1(weight, geo, *activations) and hw % 16 == 0
            and all(t.stride(3) == 1 or t.shape[3] == 1 for t in activations))


def _with_strides_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with ``like``'s strides (a copy unless they already agree): the forward reads
    the residual with the output's offsets."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _forward_launch(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], residual: Optional[Tensor], out: Tensor,
    moments: Optional[Tensor], og: int, ig: int, rows: int, geo: Sequence[int], groups: int,
    activation: int, cfg: Dict[str, int],
) -> Tuple[Tuple[int, ...], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of the forward kernel's launch (the launcher's, and the AOT
    cases', which pass meta tensors of real shapes): ``_conv_forward_kernel[grid](*args,
    **kwargs)``. The output (and residual) must have dense planes (the launcher allocates
    them NCHW or NHWC)."""
    n, _, h, w = input.shape
    _, c_out, ho, wo = out.shape
    hwo = ho * wo
    tiles = triton.cdiv(hwo, cfg["BLOCK_M"])
    num_m = n * tiles
    grid = (num_m * triton.cdiv(og, cfg["BLOCK_N"]), groups)
    # Absent optional tensors: a dummy pointer (never read), so the signature is stable.
    args = (
        input, weight, out if bias is None else bias, out if scale is None else scale,
        out if shift is None else shift, out if residual is None else residual, out,
        out if moments is None else moments,
        h, w, wo, hwo, tiles, num_m, og, ig, rows, weight.shape[2], weight.shape[3], c_out,
        *input.stride(), *weight.stride(), out.stride(0), out.stride(1), out.stride(3),
        0 if bias is None else bias.stride(0), 0 if scale is None else scale.stride(0),
        0 if shift is None else shift.stride(0),
        *geo,
    )
    kwargs = dict(
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_RES=residual is not None, ACT=activation, STATS=moments is not None,
        ALLOW_TF32=_allow_tf32(input.dtype), IS_1X1=_gemm_1x1(weight, geo, input),
        EVEN_K=ig % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=GROUP_M,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return grid, args, kwargs


def _forward(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], out_channels: int,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
    activation: int, stats: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    _check_activation(activation)
    check_device(input, weight, bias, scale, shift, residual)
    _check_dtypes(input, weight, bias, scale, shift, residual)
    n, h, w, ho, wo, og, ig, rows, geo = _geometry(
        input.shape, weight, out_channels, stride, padding, dilation, groups)
    check_int32("conv2d", input_image_span=image_span(input))
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"slimops.kernels.conv2d: bias must be [{weight.shape[0]}], "
                         f"got {tuple(bias.shape)}")
    _vector(scale, out_channels, "scale")
    _vector(shift, out_channels, "shift")
    out = torch.empty((n, out_channels, ho, wo), dtype=input.dtype, device=input.device,
                      memory_format=memory_format(input))
    if residual is not None and tuple(residual.shape) != tuple(out.shape):
        raise ValueError(f"slimops.kernels.conv2d: residual must be {tuple(out.shape)}, "
                         f"got {tuple(residual.shape)}")
    cfg = _pick(ho * wo, og, input.dtype, _streamed(weight, geo, ho * wo, input))
    # One row of statistics per M tile: tiles stay inside one image.
    num_m = n * triton.cdiv(ho * wo, cfg["BLOCK_M"])
    moments = None
    if stats:
        # Every (M tile, channel) is written by the kernel: no zero fill.
        moments = torch.empty((3, num_m, out_channels), dtype=torch.float32,
                              device=input.device)
    if num_m == 0:
        return out, moments
    if residual is not None:
        # An activation, not a weight: read with the output's offsets (a no-op when it has
        # the output's memory format, the usual case).
        residual = _with_strides_of(residual, out)
    grid, args, kwargs = _forward_launch(input, weight, bias, scale, shift, residual, out,
                                         moments, og, ig, rows, geo, groups, activation,
                                         cfg)
    traceable(_conv_forward_kernel)[grid](*args, **kwargs)
    return out, moments


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    out_channels: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    activation: int,
) -> Tensor:
    """``slimops::conv2d``: the (grouped) convolution of ``input [N, C_in, H, W]`` with the
    per-group prefixes of the full ``weight [G * Og, Ig, kh, kw]`` (read in place), epilogue
    ``act((z + bias) * scale + shift + residual)`` fused.

    ``bias``: the full ``[G * Og]`` bias or None (it follows the weight's rows); ``scale``,
    ``shift``: length ``out_channels`` or None; ``residual``: ``[N, out_channels, Ho, Wo]`` or
    None (copied to the output's strides if it has others); ``activation``: 0 none, 1 relu,
    2 relu6. ``input`` is read through its strides (no copy). Returns a
    ``[N, out_channels, Ho, Wo]`` tensor of the input's dtype, channels_last when the input is
    (``memory_format``), contiguous otherwise.
    """
    return _forward(input, weight, bias, out_channels, stride, padding, dilation, groups,
                    scale, shift, residual, activation, False)[0]


def conv2d_with_stats(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    out_channels: int,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tuple[Tensor, Tensor]:
    """The forward of ``conv2d`` (bias added, no other epilogue) returning ``(z, moments)``:
    ``moments`` is fp32 ``[3, num_m_tiles, out_channels]``, planes count, mean and M2 (sum
    of squared deviations from the tile's mean), row ``i`` those of ``z`` per channel over
    the ``i``-th M tile: tiles of ``BLOCK_M`` pixels inside one image (image-major, ``(h, w)``
    order; an image's last tile may be shorter). The batch norm merges the rows
    (``batch_norm_act_from_partials``). The statistics are those of ``z`` as stored (rounded
    to its dtype), in fp32, deterministically
    (``slimops.kernels.batch_norm_act.store_tile_moments``).
    """
    z, moments = _forward(input, weight, bias, out_channels, stride, padding, dilation,
                          groups, None, None, None, ACT_NONE, True)
    return z, moments  # type: ignore[return-value]


def _backward_input_launch(
    grad_z: Tensor, weight: Tensor, grad_input: Tensor, og: int, ig: int, rows: int,
    geo: Sequence[int], groups: int, cfg: Dict[str, int],
) -> Tuple[Tuple[int, ...], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of the input gradient's launch (``grad_input`` with dense
    planes, NCHW or NHWC)."""
    n, _, h, w = grad_input.shape
    ho, wo = grad_z.shape[2:]
    tiles = triton.cdiv(h * w, cfg["BLOCK_M"])
    num_m = n * tiles
    grid = (num_m * triton.cdiv(ig, cfg["BLOCK_N"]), groups)
    args = (
        grad_z, weight, grad_input,
        h, w, ho, wo, h * w, tiles, num_m, og, ig, rows, weight.shape[2], weight.shape[3],
        *grad_z.stride(), *weight.stride(),
        grad_input.stride(0), grad_input.stride(1), grad_input.stride(3), *geo,
    )
    kwargs = dict(
        ALLOW_TF32=_allow_tf32(grad_z.dtype), IS_1X1=_gemm_1x1(weight, geo, grad_z),
        EVEN_K=og % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=GROUP_M,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return grid, args, kwargs


def conv2d_backward_input(
    grad_z: Tensor,
    weight: Tensor,
    input_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """``slimops::conv2d_backward_input``: the gradient w.r.t. the input ``[N, C_in, H, W]``
    (``input_size``) from the gradient of the conv output ``z`` (before the epilogue,
    ``[N, out_channels, Ho, Wo]``, any strides). Deterministic gather (no atomics); the weight
    prefixes are read in place. Returns a tensor of grad_z's dtype, channels_last when grad_z
    is (``memory_format``), contiguous otherwise."""
    check_device(grad_z, weight)
    _check_dtypes(grad_z, weight)
    if grad_z.dim() != 4:
        raise ValueError(f"slimops.kernels.conv2d_backward_input: grad_z must be 4-D, "
                         f"got {tuple(grad_z.shape)}")
    out_channels = grad_z.shape[1]
    n, h, w, ho, wo, og, ig, rows, geo = _geometry(
        input_size, weight, out_channels, stride, padding, dilation, groups)
    if tuple(grad_z.shape) != (n, out_channels, ho, wo):
        raise ValueError(f"slimops.kernels.conv2d_backward_input: grad_z must be "
                         f"{(n, out_channels, ho, wo)}, got {tuple(grad_z.shape)}")
    check_int32("conv2d_backward_input", grad_z_image_span=image_span(grad_z))
    grad_input = torch.empty((n, ig * groups, h, w), dtype=grad_z.dtype, device=grad_z.device,
                             memory_format=memory_format(grad_z))
    if n * h * w == 0:
        return grad_input
    cfg = _pick(h * w, ig, grad_z.dtype, _streamed(weight, geo, h * w, grad_z))
    grid, args, kwargs = _backward_input_launch(grad_z, weight, grad_input, og, ig, rows, geo,
                                                groups, cfg)
    traceable(_conv_backward_input_kernel)[grid](*args, **kwargs)
    return grad_input


def _split_k_target(device: torch.device) -> int:
    """Programs the weight gradient aims for: two waves of the GPU's SMs (0 off the GPU)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 2 * _sm_count(index)


def _split_count(tiles: int, k_tiles: int, target: int) -> int:
    """Splits of ``k_tiles`` K tiles over programs of ``tiles`` output tiles (see
    ``_weight_splits``)."""
    if target == 0:
        return max(1, min(2, k_tiles))
    return max(1, min(triton.cdiv(target, max(tiles, 1)), k_tiles // 8))


def _weight_splits(n: int, hwo: int, og: int, ig: int, weight: Tensor, groups: int,
                   cfg: Dict[str, int], target: int) -> Tuple[int, int]:
    """``(splits, per_split)``: the weight gradient's K (``n`` images x their pixel tiles of
    ``BLOCK_K``) cut into ``splits`` ranges of ``per_split`` K tiles for about ``target``
    programs, each keeping at least 8 K tiles (partials cost a write and a read); ``target``
    0 (the interpreter): 2 splits when possible, so the tests cover the partial-sum path."""
    kh, kw = weight.shape[2], weight.shape[3]
    tiles = (triton.cdiv(og, cfg["BLOCK_M"]) * kh * kw * triton.cdiv(ig, cfg["BLOCK_N"])
             * groups)
    k_tiles = n * triton.cdiv(hwo, cfg["BLOCK_K"])
    per_split = triton.cdiv(k_tiles, _split_count(tiles, k_tiles, target))
    return triton.cdiv(k_tiles, per_split), per_split  # no empty split


def _backward_weight_launch(
    grad_z: Tensor, input: Tensor, weight: Tensor, dst: Tensor, dst_strides: Sequence[int],
    og: int, ig: int, geo: Sequence[int], groups: int, splits: int, per_split: int,
    cfg: Dict[str, int],
) -> Tuple[Tuple[int, ...], Tuple[Any, ...], Dict[str, Any]]:
    """``(grid, args, kwargs)`` of the weight gradient's launch into ``dst`` (the full
    gradient or the fp32 partials) with ``dst_strides`` (split, group, row, ci, kh, kw)."""
    n, _, h, w = input.shape
    ho, wo = grad_z.shape[2:]
    kh, kw = weight.shape[2], weight.shape[3]
    tiles = triton.cdiv(ho * wo, cfg["BLOCK_K"])
    # The grouped order on the axes (_weight_tile): x, GROUP_M output-channel tiles (fewer
    # when there are fewer); y, (input-channel block, tap); z, (split, group, M group).
    num_m = triton.cdiv(og, cfg["BLOCK_M"])
    m_group = min(GROUP_M, num_m)
    num_mg = triton.cdiv(num_m, m_group)
    grid = (m_group, kh * kw * triton.cdiv(ig, cfg["BLOCK_N"]), num_mg * groups * splits)
    args = (
        grad_z, input, dst,
        h, w, wo, ho * wo, tiles, n * tiles, per_split, og, ig, kw, kh * kw, m_group, num_mg,
        groups,
        *grad_z.stride(), *input.stride(), *dst_strides, *geo,
    )
    kwargs = dict(
        ALLOW_TF32=_allow_tf32(input.dtype), IS_1X1=_gemm_1x1(weight, geo, grad_z, input),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return grid, args, kwargs


def conv2d_backward_weight(
    grad_z: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """``slimops::conv2d_backward_weight``: the gradient w.r.t. the full weight, of its shape
    and dtype (contiguous): each group's active ``[og, ig, kh, kw]`` prefix filled, every other
    entry zero, so autograd accumulates it as is. fp32 accumulation; K (the batch's output
    pixels) split over programs with fp32 partials summed in a fixed order (deterministic)."""
    check_device(grad_z, input, weight)
    _check_dtypes(input, grad_z, weight)
    if grad_z.dim() != 4:
        raise ValueError(f"slimops.kernels.conv2d_backward_weight: grad_z must be 4-D, "
                         f"got {tuple(grad_z.shape)}")
    out_channels = grad_z.shape[1]
    n, h, w, ho, wo, og, ig, rows, geo = _geometry(
        input.shape, weight, out_channels, stride, padding, dilation, groups)
    if tuple(grad_z.shape) != (n, out_channels, ho, wo):
        raise ValueError(f"slimops.kernels.conv2d_backward_weight: grad_z must be "
                         f"{(n, out_channels, ho, wo)}, got {tuple(grad_z.shape)}")
    check_int32("conv2d_backward_weight", grad_z_image_span=image_span(grad_z),
                input_image_span=image_span(input))
    grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    if n * ho * wo == 0:
        return grad_weight
    cfg = _pick(og, ig, weight.dtype, _streamed(weight, geo, ho * wo, grad_z, input))
    splits, per_split = _weight_splits(n, ho * wo, og, ig, weight, groups, cfg,
                                       _split_k_target(weight.device))
    kh, kw = weight.shape[2], weight.shape[3]
    if splits == 1:
        # Straight into the prefix of the full-size gradient: group g's rows start at g * Og.
        dst = grad_weight
        dst_strides = (0, rows * grad_weight.stride(0), *grad_weight.stride())
    else:
        dst = torch.empty((splits, groups, og, ig, kh, kw), dtype=torch.float32,
                          device=weight.device)
        dst_strides = dst.stride()
    grid, args, kwargs = _backward_weight_launch(grad_z, input, weight, dst, dst_strides, og, ig,
                                                 geo, groups, splits, per_split, cfg)
    traceable(_conv_backward_weight_kernel)[grid](*args, **kwargs)
    if splits > 1:
        # Fixed-order sum of the partials, then one cast into the per-group prefixes (a
        # strided view of the full gradient).
        prefix = grad_weight.view(groups, rows, *weight.shape[1:])[:, :og, :ig]
        prefix.copy_(dst.sum(0))
    return grad_weight


# ----------------------------------------------------------------------------- AOT


def _cfg_tag(cfg: Dict[str, int]) -> str:
    return (f"m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}k{cfg['BLOCK_K']}_w{cfg['num_warps']}"
            f"s{cfg['num_stages']}")


# S-MobileNet v2 (width 1.0, batch 32) layers the AOT cases compile at, plus a ResNet-style
# dense 3x3 (the general path with the large tile): name -> (batch, C_in, C_out, H = W,
# kernel, stride, padding, channels_last). About 90% of MobileNet v2's dense convolutions are
# the 1x1 expand/project layers at 56, 28, 14 and 7.
AOT_SHAPES: Dict[str, Tuple[int, int, int, int, int, int, int, bool]] = {
    "expand_56": (32, 24, 144, 56, 1, 1, 0, False),
    "project_56": (32, 144, 24, 56, 1, 1, 0, False),
    "expand_28": (32, 32, 192, 28, 1, 1, 0, False),
    "expand_14": (32, 64, 384, 14, 1, 1, 0, False),
    "expand_7": (32, 160, 960, 7, 1, 1, 0, False),
    "stem_224": (32, 3, 32, 224, 3, 2, 1, False),
    "dense3x3_56": (32, 64, 64, 56, 3, 1, 1, False),
    "expand_56_nhwc": (32, 24, 144, 56, 1, 1, 0, True),
    # batch 1: the weight gradient's K is too short to split (one split writes the weight's
    # dtype straight into the full gradient, a binary of its own)
    "expand_7_b1": (1, 160, 960, 7, 1, 1, 0, False),
}
# Forward cases: (shape, epilogue). "eval": folded batch norm (scale, shift) + relu6, the
# inference form; "res": + residual, no activation (the project layer); "stats": bias +
# statistics (training).
AOT_FORWARD = [("expand_56", "eval"), ("expand_56", "stats"), ("project_56", "res"),
               ("expand_28", "eval"), ("expand_14", "eval"), ("expand_7", "eval"),
               ("stem_224", "eval"), ("stem_224", "stats"), ("dense3x3_56", "eval"),
               ("expand_56_nhwc", "eval")]
AOT_BACKWARD = ["expand_56", "expand_28", "expand_14", "expand_7", "stem_224", "dense3x3_56",
                "expand_56_nhwc", "expand_7_b1"]
# fp32 with exact (IEEE) products is not the default (TF32 is): compiled at one shape per
# tuning entry, for the spill and occupancy check.
AOT_IEEE_SHAPES = {"expand_56", "expand_28", "stem_224", "dense3x3_56"}
# The weight gradient's split-K assumes an H100's 132 SMs (2 waves).
AOT_SPLIT_TARGET = 2 * 132
# Resident blocks per SM each tuning entry must keep (its index in the table): the fused
# epilogue and the gather live in registers, so the large tiles hold fewer blocks. fp32 with
# exact (IEEE) products runs its dot on FMAs, which takes more registers: floor 1 there.
MIN_OCCUPANCY = {0: 4, 1: 3, 2: 2, 3: 2}
MIN_OCCUPANCY_IEEE = 1


def _meta(shape: Sequence[int], dtype: torch.dtype, nhwc: bool = False) -> Tensor:
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def _cfg_index(cfg: Dict[str, int], dtype: torch.dtype) -> int:
    return configs(dtype).index(cfg)


def aot_cases() -> List[AotCase]:
    """The binaries the launchers compile at ``AOT_SHAPES``, specialised exactly as triton's
    JIT specialises their launches (``AotCase.from_launch`` on the launchers' own argument
    lists, built from meta tensors of the real shapes): per dtype (fp16, bf16, fp32 with TF32;
    fp32 IEEE at ``AOT_IEEE_SHAPES``), the forward at ``AOT_FORWARD`` and both gradients at
    ``AOT_BACKWARD``. ``meta`` labels each case (kernel, shape, H, path, layout, dtype) for
    the layout checks of tests/kernels/test_kernels_compiled.py."""
    fwd, bwd_in, bwd_w = (compiled(k) for k in (
        _conv_forward_kernel, _conv_backward_input_kernel, _conv_backward_weight_kernel))
    cases: List[AotCase] = []

    def add(kind: str, fn: Any, shape: str, prec: str, mode: str, dtype: torch.dtype,
            cfg: Dict[str, int], args: Sequence[Any], kwargs: Dict[str, Any], tf32: bool) -> None:
        kw = dict(kwargs, ALLOW_TF32=tf32)
        warps, stages = kw.pop("num_warps"), kw.pop("num_stages")
        n, cin, cout, h, k, st, pad, nhwc = AOT_SHAPES[shape]
        index = _cfg_index(cfg, dtype)
        cases.append(AotCase.from_launch(
            f"conv2d_{kind}_{shape}_{prec}{'_' + mode if mode else ''}_{_cfg_tag(cfg)}", fn,
            args, kw, warps, stages,
            min_occupancy=MIN_OCCUPANCY_IEEE if prec == "float32" else MIN_OCCUPANCY[index],
            meta=dict(kind=kind, shape=shape, hw=h, kernel=k, layout="nhwc" if nhwc else "nchw",
                      prec=prec, mode=mode, path="1x1" if kw["IS_1X1"] else "general",
                      config=index)))

    for dtype in DTYPES:
        tag = str(dtype).split(".")[-1]
        for tf32 in ((True, False) if dtype == torch.float32 else (False,)):
            prec = f"{tag}{'_tf32' if tf32 else ''}"
            ieee = dtype == torch.float32 and not tf32
            for shape, mode in AOT_FORWARD:
                if ieee and shape not in AOT_IEEE_SHAPES:
                    continue
                n, cin, cout, h, k, st, pad, nhwc = AOT_SHAPES[shape]
                geo = (st, st, pad, pad, 1, 1)
                ho = (h + 2 * pad - k) // st + 1
                x = _meta((n, cin, h, h), dtype, nhwc)
                weight = _meta((cout, cin, k, k), dtype)
                out = _meta((n, cout, ho, ho), dtype, nhwc)
                vec = _meta((cout,), dtype)
                cfg = _pick_gpu(ho * ho, cout, dtype, _streamed(weight, geo, ho * ho, x))
                num_m = n * triton.cdiv(ho * ho, cfg["BLOCK_M"])
                stats = _meta((3, num_m, cout), torch.float32) if mode == "stats" else None
                _, args, kwargs = _forward_launch(
                    x, weight, vec if mode == "stats" else None,
                    vec if mode != "stats" else None, vec if mode != "stats" else None,
                    out if mode == "res" else None, out, stats, cout, cin, cout, geo, 1,
                    ACT_RELU6 if mode == "eval" else ACT_NONE, cfg)
                add("forward", fwd, shape, prec, mode, dtype, cfg, args, kwargs, tf32)
            for shape in AOT_BACKWARD:
                if ieee and shape not in AOT_IEEE_SHAPES:
                    continue
                n, cin, cout, h, k, st, pad, nhwc = AOT_SHAPES[shape]
                geo = (st, st, pad, pad, 1, 1)
                ho = (h + 2 * pad - k) // st + 1
                x = _meta((n, cin, h, h), dtype, nhwc)
                weight = _meta((cout, cin, k, k), dtype)
                gz = _meta((n, cout, ho, ho), dtype, nhwc)
                cfg = _pick_gpu(h * h, cin, dtype, _streamed(weight, geo, h * h, gz))
                _, args, kwargs = _backward_input_launch(gz, weight, x, cout, cin, cout, geo, 1,
                                                         cfg)
                add("backward_input", bwd_in, shape, prec, "", dtype, cfg, args, kwargs, tf32)
                cfg = _pick_gpu(cout, cin, dtype, _streamed(weight, geo, ho * ho, gz, x))
                splits, per_split = _weight_splits(n, ho * ho, cout, cin, weight, 1, cfg,
                                                   AOT_SPLIT_TARGET)
                if splits == 1:
                    dst, mode = weight, "direct"
                    dst_strides: Tuple[int, ...] = (0, cout * weight.stride(0), *weight.stride())
                else:
                    dst = _meta((splits, 1, cout, cin, k, k), torch.float32)
                    dst_strides, mode = dst.stride(), "partials"
                _, args, kwargs = _backward_weight_launch(gz, x, weight, dst, dst_strides, cout,
                                                          cin, geo, 1, splits, per_split, cfg)
                add("backward_weight", bwd_w, shape, prec, mode, dtype, cfg, args, kwargs, tf32)
    return cases


def conv2d_backward(
    grad_z: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tuple[Tensor, Tensor]:
    """``slimops::conv2d_backward``: ``(grad_input, grad_weight)``, the two launchers above
    in turn. conv2d's autograd asks for both gradients through this one op on every device;
    the CPU op can make one oneDNN call for the pair, while here each gradient has its own
    kernel, with nothing shared between them to fuse."""
    return (conv2d_backward_input(grad_z, weight, list(input.shape), stride, padding, dilation,
                                  groups),
            conv2d_backward_weight(grad_z, input, weight, stride, padding, dilation, groups))


__all__ = [
    "CONFIGS",
    "CONFIGS_FP32",
    "aot_cases",
    "conv2d",
    "conv2d_backward",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "conv2d_with_stats",
    "configs",
    "memory_format",
]
