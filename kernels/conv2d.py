"""Triton kernels of the slimmable (grouped) convolution, its two backward ops, and the
forward with per-channel statistics for switchable batch norm in training.

Weights: the full ``[G * Og, Ig, kh, kw]`` tensor. Group ``g`` uses the first
``og = out_channels // G`` rows of its block of ``Og`` rows and the first ``ig = C_in // G``
input channels (per-group prefixes, ``slimops.reference.conv2d``). Every kernel addresses
row ``g * Og + o`` through the full tensor's strides: the active weight is never sliced into
a contiguous copy, which is what slimops exists to avoid.

All three convolutions are implicit GEMMs, one program per (M tile, N tile, group), with the
activation operand gathered on the fly from NCHW (padding and, for the input gradient,
stride divisibility as load masks); ``kh``/``kw``, stride, padding and dilation are run-time
arguments, so one binary serves every geometry. K is walked tap by tap, a block of channels
at a time, so the gather's address and mask are a per-pixel vector plus a per-channel vector
(no per-element division):

=========================  ===================  =====================  ====================
kernel                     M                    N                      K
=========================  ===================  =====================  ====================
forward (+ stats)          N * Ho * Wo pixels   og output channels     kh * kw * ig
input gradient             N * H * W pixels     ig input channels      kh * kw * og
weight gradient            og output channels   ig (one tap/program)   N * Ho * Wo (split)
=========================  ===================  =====================  ====================

* The forward fuses ``act((z + bias[c]) * scale[c] + shift[c] + residual)``, each term under a
  constexpr flag so an absent term costs nothing. With ``STATS`` it also stores, per
  output channel, the moments (count, mean, M2) of its tile's (bias-added) outputs into row
  ``pid_m`` of an fp32 ``[3, num_m_tiles, out_channels]`` buffer: deterministic, no atomics;
  the batch norm's merge tree combines the rows.
* The weight gradient's K (every output pixel of the batch) is long and its M x N small at
  narrow widths, so K is split over programs that write fp32 partials, summed in a fixed
  order afterwards (deterministic); with one split the kernel writes the weight's dtype
  straight into the prefix of the zero-initialised full-size gradient.

Accumulation is fp32 for every dtype; outputs are in the input's dtype. fp32 operands use
TF32 tensor cores exactly when ``torch.backends.cudnn.allow_tf32`` allows it for
``F.conv2d`` (on by default), through the ``ALLOW_TF32`` constexpr.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from slimops.kernels._aot import AotCase
from slimops.kernels._common import (
    ACT_NONE,
    ACT_RELU6,
    TRITON_PTR,
    check_device,
    check_int32,
    conv_geometry,
    image_span,
    interpreting,
)
from slimops.kernels.batch_norm_act import store_tile_moments
from slimops.kernels.epilogue import (
    DTYPES,
    _activate,
    _check_activation,
    _sm_count,
    aot_signature,
    compiled,
)

# Implicit-GEMM tiles, shared by the three kernels; _pick chooses one per call from the GEMM's
# M x N. Gathered operands and the fused epilogue's address tiles live in registers, so
# registers, not shared memory, bound the tile. Each entry was chosen from the AOT sweep
# (zero spills and zero stack on sm_80 and sm_90, every dtype and flag set): 128 x 128 spills
# in every dtype; BLOCK_K = 32 on the 128 x 64 tile spills with fp32 on the IEEE (FMA) dot
# path; the 64 x 64 tile sits at 254 registers with 4 warps (full epilogue, sm_90), and with
# 8 warps and 3 stages ptxas leaves an 8-byte stack frame in some cases.
CONFIGS: List[Dict[str, int]] = [
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},
]


def _pick(m: int, n: int) -> Dict[str, int]:
    """The tuning entry for an ``M x N`` GEMM (per group). The interpreter always gets the
    smallest: its cost is per program op, and small tiles make the tests cover several M
    tiles (the statistics' partial rows) and several K iterations."""
    if interpreting() or n <= 32 or m <= 32:
        return CONFIGS[0]
    if m >= 4096 and n >= 64:
        return CONFIGS[2]
    return CONFIGS[1]


def _split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Splits of the weight gradient's K: enough programs for about two waves of the GPU,
    each keeping at least 8 K blocks (partials cost a write and a read). Under the interpreter
    2 when possible, so the tests cover the partial-sum path."""
    if device.type != "cuda":
        return max(1, min(2, k_blocks))
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = 2 * _sm_count(index)
    return max(1, min(triton.cdiv(target, max(tiles, 1)), k_blocks // 8))


@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr):
    # input_precision only matters for fp32 operands: "ieee" is exact fp32 (FMA path).
    if ALLOW_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _conv_forward_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, moments_ptr,
    H, W, Ho, Wo, M, og, ig, rows_per_group, KH, KW, C_out,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww,
    bias_stride, scale_stride, shift_stride,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, STATS: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    hw_o = Ho * Wo
    # M: output pixels (n, oh, ow) of the batch.
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    n = rm // hw_o
    p = rm % hw_o
    oh = p // Wo
    ow = p % Wo
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    # int64 image bases (a batch can pass 2^31 elements); offsets inside an image are int32.
    x_rows = x_ptr + n.to(tl.int64) * sxn + (g * ig).to(tl.int64) * sxc
    # N: output channels o < og of group g, i.e. weight rows g * Og + o of the full tensor.
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < og
    w_cols = w_ptr + (g * rows_per_group + rn).to(tl.int64) * swo
    rk = tl.arange(0, BLOCK_K)
    # K = (tap, input channel), walked as one flat loop over (tap, channel block): the tap's
    # padding mask and input address are per row ([BLOCK_M] vectors, scalar div/mod per
    # iteration), and the channel offset a broadcast add, which keeps the gather cheap in
    # integer ops and registers. A channel block is padded when ig is not a multiple of
    # BLOCK_K (the first layer's 3 channels).
    c_blocks = (ig + BLOCK_K - 1) // BLOCK_K
    # tl.full / tl.reduce(_sum_combine) rather than tl.zeros / tl.sum, and no tl.cdiv: those
    # are jit functions that, under TRITON_INTERPRET=1, stay interpreted and break the AOT
    # compile of these kernels (see slimops.kernels.epilogue._sum_combine).
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for it in range(0, KH * KW * c_blocks):
        t = it // c_blocks
        ci = (it - t * c_blocks) * BLOCK_K + rk
        kh = t // KW
        kw = t - kh * KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        rmask = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cmask = ci < ig
        a = tl.load((x_rows + ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :],
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
        store_tile_moments(moments_ptr, pid_m, tl.num_programs(0), C_out, c, nmask,
                           acc.to(out_ptr.dtype.element_ty), mmask)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + c * scale_stride, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + c * shift_stride, mask=nmask, other=0.0).to(tl.float32)[None, :]
    # out (and residual): contiguous [N, C_out, Ho, Wo]; one offset tile serves both, which
    # keeps the full epilogue from spilling (a second int64 address tile does not fit).
    o_offs = (n.to(tl.int64) * C_out * hw_o + p)[:, None] + (c * hw_o)[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + o_offs, mask=mask, other=0.0).to(tl.float32)
    acc = _activate(acc, ACT)
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_backward_input_kernel(
    gz_ptr, w_ptr, gx_ptr,
    H, W, Ho, Wo, M, og, ig, rows_per_group, KH, KW, C_in,
    sgn, sgc, sgh, sgw, swo, swi, swh, sww,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    hw = H * W
    # M: input pixels (n, ih, iw).
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    n = rm // hw
    p = rm % hw
    ih = p // W
    iw = p % W
    g_rows = gz_ptr + n.to(tl.int64) * sgn + (g * og).to(tl.int64) * sgc
    # N: input channels ci < ig of group g.
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < ig
    w_cols = w_ptr + (g * rows_per_group).to(tl.int64) * swo + rn * swi
    rk = tl.arange(0, BLOCK_K)
    # K = (tap, output channel), one flat loop over (tap, channel block) as in the forward.
    o_blocks = (og + BLOCK_K - 1) // BLOCK_K
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
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
        a = tl.load((g_rows + oh * sgh + ow * sgw)[:, None] + (o * sgc)[None, :],
                    mask=rmask[:, None] & omask[None, :], other=0.0)
        b = tl.load((w_cols + kh * swh + kw * sww)[None, :] + (o * swo)[:, None],
                    mask=omask[:, None] & nmask[None, :], other=0.0)
        acc = _dot(a, b, acc, ALLOW_TF32)
    # grad_input: contiguous [N, C_in, H, W]; every input channel belongs to one group.
    c = g * ig + rn
    img = gx_ptr + n.to(tl.int64) * C_in * hw
    tl.store(img[:, None] + (p[:, None] + (c * hw)[None, :]), acc.to(gx_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _conv_backward_weight_kernel(
    gz_ptr, x_ptr, gw_ptr,
    H, W, Ho, Wo, L, per_split, og, ig, KW, num_groups,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    sws, swg, swo, swi, swh, sww,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # Axis 1: (tap, input channel block); one tap per program, so the input gather's
    # address is a per-pixel vector plus a per-channel vector.
    c_blocks = (ig + BLOCK_N - 1) // BLOCK_N
    t = tl.program_id(1) // c_blocks
    pid_n = tl.program_id(1) - t * c_blocks
    kh = t // KW
    kw = t - kh * KW
    g = tl.program_id(2) % num_groups
    split = tl.program_id(2) // num_groups
    hw_o = Ho * Wo
    # M: output channels o < og of group g.
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < og
    g_rows = gz_ptr + (g * og + rm).to(tl.int64) * sgc
    # N: input channels ci < ig of group g.
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ci < ig
    x_cols = x_ptr + (g * ig + ci).to(tl.int64) * sxc
    # K: this split's fixed range of output pixels (n, oh, ow) of the batch.
    lo = split * per_split
    hi = tl.minimum(lo + per_split, L)
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < hi
        n = (kk // hw_o).to(tl.int64)
        q = kk % hw_o
        oh = q // Wo
        ow = q % Wo
        a = tl.load(g_rows[:, None] + (n * sgn + oh * sgh + ow * sgw)[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        kvalid = kmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = tl.load((n * sxn + ih * sxh + iw * sxw)[:, None] + x_cols[None, :],
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
    out = torch.empty((n, out_channels, ho, wo), dtype=input.dtype, device=input.device)
    if residual is not None and tuple(residual.shape) != tuple(out.shape):
        raise ValueError(f"slimops.kernels.conv2d: residual must be {tuple(out.shape)}, "
                         f"got {tuple(residual.shape)}")
    m = n * ho * wo
    cfg = _pick(m, og)
    num_m = triton.cdiv(m, cfg["BLOCK_M"])
    moments = None
    if stats:
        # Every (M tile, channel) is written by the kernel: no zero fill.
        moments = torch.empty((3, num_m, out_channels), dtype=torch.float32,
                              device=input.device)
    if m == 0:
        return out, moments
    if residual is not None:
        # An activation, not a weight: read with the output's offsets (a no-op when it is
        # already contiguous, the usual case).
        residual = residual.contiguous()
    # Absent optional tensors: a dummy pointer (never read), so the signature is stable.
    grid = (num_m, triton.cdiv(og, cfg["BLOCK_N"]), groups)
    _conv_forward_kernel[grid](
        input, weight, out if bias is None else bias, out if scale is None else scale,
        out if shift is None else shift, out if residual is None else residual, out,
        out if moments is None else moments,
        h, w, ho, wo, m, og, ig, rows, weight.shape[2], weight.shape[3], out_channels,
        *input.stride(), *weight.stride(),
        0 if bias is None else bias.stride(0), 0 if scale is None else scale.stride(0),
        0 if shift is None else shift.stride(0),
        *geo,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_RES=residual is not None, ACT=activation, STATS=stats,
        ALLOW_TF32=_allow_tf32(input.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
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
    None (made contiguous if it is not); ``activation``: 0 none, 1 relu, 2 relu6. ``input`` is read through
    its strides (no copy). Returns a contiguous ``[N, out_channels, Ho, Wo]`` tensor of the
    input's dtype.
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
    the ``i``-th tile of output pixels (``N * Ho * Wo`` in NHW order; the last tile may be
    shorter). The batch norm merges the rows (``batch_norm_act_from_partials``). The
    statistics are those of ``z`` as stored (rounded to its dtype), in fp32,
    deterministically (``slimops.kernels.batch_norm_act.store_tile_moments``).
    """
    z, moments = _forward(input, weight, bias, out_channels, stride, padding, dilation,
                          groups, None, None, None, ACT_NONE, True)
    return z, moments  # type: ignore[return-value]


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
    prefixes are read in place. Returns a contiguous tensor of grad_z's dtype."""
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
    c_in = ig * groups
    grad_input = torch.empty((n, c_in, h, w), dtype=grad_z.dtype, device=grad_z.device)
    m = n * h * w
    if m == 0:
        return grad_input
    cfg = _pick(m, ig)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(ig, cfg["BLOCK_N"]), groups)
    _conv_backward_input_kernel[grid](
        grad_z, weight, grad_input,
        h, w, ho, wo, m, og, ig, rows, weight.shape[2], weight.shape[3], c_in,
        *grad_z.stride(), *weight.stride(), *geo,
        ALLOW_TF32=_allow_tf32(grad_z.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return grad_input


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
    kh, kw = weight.shape[2], weight.shape[3]
    total = n * ho * wo
    if total == 0:
        return grad_weight
    cfg = _pick(og, ig * kh * kw)
    # Axis 1 walks (tap, input-channel block): one tap per program.
    col_tiles = kh * kw * triton.cdiv(ig, cfg["BLOCK_N"])
    tiles = triton.cdiv(og, cfg["BLOCK_M"]) * col_tiles * groups
    k_blocks = triton.cdiv(total, cfg["BLOCK_K"])
    splits = _split_k(tiles, k_blocks, weight.device)
    per_split = triton.cdiv(k_blocks, splits) * cfg["BLOCK_K"]
    splits = triton.cdiv(total, per_split)  # no empty split
    if splits == 1:
        # Straight into the prefix of the full-size gradient: group g's rows start at g * Og.
        dst = grad_weight
        dst_strides = (0, rows * grad_weight.stride(0), *grad_weight.stride())
    else:
        dst = torch.empty((splits, groups, og, ig, kh, kw), dtype=torch.float32,
                          device=weight.device)
        dst_strides = dst.stride()
    grid = (triton.cdiv(og, cfg["BLOCK_M"]), col_tiles, groups * splits)
    _conv_backward_weight_kernel[grid](
        grad_z, input, dst,
        h, w, ho, wo, total, per_split, og, ig, kw, groups,
        *grad_z.stride(), *input.stride(), *dst_strides, *geo,
        ALLOW_TF32=_allow_tf32(input.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
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


def aot_cases() -> List[AotCase]:
    """Per dtype (fp32 in both dot precisions, IEEE and TF32) and configuration: the forward
    without epilogue, with the full one (bias, scale, shift, residual, relu6) and with
    STATS (bias + statistics); the input gradient; the weight gradient (into the weight's
    dtype, and into fp32 partials when K is split)."""
    cases: List[AotCase] = []
    for dtype in DTYPES:
        ptr = TRITON_PTR[dtype]
        tag = str(dtype).split(".")[-1]
        for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            prec = f"{tag}{'_tf32' if tf32 else ''}"
            for cfg in CONFIGS:
                tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                             BLOCK_K=cfg["BLOCK_K"], ALLOW_TF32=tf32)
                launch = (cfg["num_warps"], cfg["num_stages"])
                stats_ptrs = {"moments_ptr": "*fp32"}
                for mode in ("plain", "full", "stats"):
                    full = mode == "full"
                    ce = dict(HAS_BIAS=mode != "plain", HAS_SCALE=full, HAS_SHIFT=full,
                              HAS_RES=full, ACT=ACT_RELU6 if full else ACT_NONE,
                              STATS=mode == "stats", **tiles)
                    cases.append(AotCase(
                        f"conv2d_forward_{prec}_{_cfg_tag(cfg)}_{mode}", _conv_forward_kernel,
                        aot_signature(_conv_forward_kernel, ptr, ce, stats_ptrs), ce, *launch))
                cases.append(AotCase(
                    f"conv2d_backward_input_{prec}_{_cfg_tag(cfg)}", _conv_backward_input_kernel,
                    aot_signature(_conv_backward_input_kernel, ptr, tiles), tiles, *launch))
                for dst in ("weight", "partials"):
                    over = {"gw_ptr": "*fp32"} if dst == "partials" else {}
                    if dst == "partials" and dtype == torch.float32:
                        continue  # the same binary as the fp32 weight
                    cases.append(AotCase(
                        f"conv2d_backward_weight_{prec}_{_cfg_tag(cfg)}_{dst}",
                        _conv_backward_weight_kernel,
                        aot_signature(_conv_backward_weight_kernel, ptr, tiles, over), tiles,
                        *launch))
    # Compilable JITFunctions even when the tests run under the interpreter.
    for case in cases:
        case.fn = compiled(case.fn)
    return cases


__all__ = [
    "CONFIGS",
    "aot_cases",
    "conv2d",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "conv2d_with_stats",
]
