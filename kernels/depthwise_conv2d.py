"""Triton kernels of the slimmable depthwise convolution and its two backward ops.

The active weight is the prefix ``W[:C]`` of the full ``[C_full, 1, kh, kw]`` weight (``C`` =
the input's channels). Every kernel reads it in place through the full tensor's strides:
slicing + ``contiguous()`` would copy the shared weight on every call, which is exactly what
slimops exists to avoid.

* Forward (``depthwise_conv2d``): a direct convolution, one program per (image-channel plane,
  block of output pixels). The taps are unrolled (``kh``/``kw`` are compile-time constants:
  depthwise kernels come in a handful of sizes), stride/padding/dilation are run-time
  arguments (one binary per kernel size, not per geometry). The epilogue
  ``act((z + bias[c]) * scale[c] + shift[c] + residual)`` is fused into the same pass, each
  term switched by a constexpr flag so an absent term costs nothing.
* Forward with statistics (``depthwise_conv2d_with_stats``): the same kernel under the
  ``STATS`` constexpr (bias only, no other epilogue) also stores the moments (count, mean,
  M2) of each program's stored outputs into row ``n * num_pixel_blocks + pixel_block``,
  column ``c`` of an fp32 ``[3, N * num_pixel_blocks, C]`` buffer: deterministic, no
  atomics; the batch norm (``batch_norm_act_from_partials``) merges the rows.
* Input gradient (``depthwise_conv2d_backward_input``): a gather, one program per (plane,
  block of input pixels): each input pixel sums the output pixels that read it, so there
  are no atomics and the result is deterministic.
* Weight gradient (``depthwise_conv2d_backward_weight``): per (channel, tap) a reduction over
  ``N * Ho * Wo``. Two deterministic stages: stage 1 gives each (tile, channel) program a
  fixed range of output pixels and writes fp32 partial sums ``[T, C, TAPS]``; stage 2 sums
  them in a fixed order, one program per channel. Splitting the range into tiles keeps the
  GPU busy at narrow widths (few channels, large planes) where one program per channel
  would not. The result has the full weight's shape, the prefix filled and the rest zero.

Accumulation is fp32 for every input dtype; outputs are in the input's dtype.
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
)
from slimops.kernels.batch_norm_act import store_tile_moments
from slimops.kernels.epilogue import (
    DTYPES,
    _activate,
    _check_activation,
    _check_vector,
    _sum_combine,
    aot_signature,
    compiled,
    split_tiles,
)

# BLOCK: output (forward) or input (backward-input) pixels per program. WTILE: elements of
# the weight-gradient tile [TAPS, WTILE // TAPS] (taps padded to a power of two), so the tile,
# and with it the registers per thread, stays the same size for 3x3 and 5x5 kernels.
CONFIGS: List[Dict[str, int]] = [
    {"BLOCK": 64, "WTILE": 1024, "num_warps": 2},
    {"BLOCK": 128, "WTILE": 1024, "num_warps": 4},
    {"BLOCK": 256, "WTILE": 2048, "num_warps": 4},
    {"BLOCK": 512, "WTILE": 2048, "num_warps": 8},
]

# Stage 2 of the weight gradient: partial tiles summed per loop iteration.
REDUCE_BLOCK_T = 16
# Kernel sizes the AOT sweep compiles (the MobileNet family's depthwise kernels).
AOT_KERNEL_SIZES = (3, 5)


def _pick(pixels: int) -> Dict[str, int]:
    """The configuration for planes of ``pixels`` pixels: one program covers a plane's row
    block, so small planes (the late MobileNet stages, 7x7 and 14x14) take small blocks that
    leave few lanes idle, large planes large blocks (fewer programs, longer runs)."""
    if pixels <= 64:
        return CONFIGS[0]
    if pixels <= 4096:
        return CONFIGS[1]
    return CONFIGS[2] if pixels <= 1 << 16 else CONFIGS[3]


def _taps_p2(kh: int, kw: int) -> int:
    return triton.next_power_of_2(kh * kw)


@triton.jit
def _dw_forward_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, moments_ptr,
    C, H, W, Ho, Wo,
    sxn, sxc, sxh, sxw, swc, swh, sww,
    bias_stride, scale_stride, shift_stride,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
    STATS: tl.constexpr = False,
):
    plane = tl.program_id(0)
    n = plane // C
    c = plane % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pmask = offs < Ho * Wo
    oh = offs // Wo
    ow = offs % Wo
    x_base = x_ptr + n.to(tl.int64) * sxn + c.to(tl.int64) * sxc
    w_base = w_ptr + c.to(tl.int64) * swc
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for i in tl.static_range(KH):
        ih = ih0 + i * dil_h
        hmask = pmask & (ih >= 0) & (ih < H)
        for j in tl.static_range(KW):
            iw = iw0 + j * dil_w
            m = hmask & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + ih * sxh + iw * sxw, mask=m, other=0.0).to(tl.float32)
            wv = tl.load(w_base + i * swh + j * sww).to(tl.float32)
            acc += xv * wv
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c * bias_stride).to(tl.float32)
    if STATS:
        # The moments (count, mean, M2) of the stored values (rounded to the output dtype),
        # so batch norm normalises with the moments of the tensor it reads. Row
        # n * blocks + block: unique per (image, pixel block) of channel c; a [BLOCK, 1]
        # tile, one column (channel c).
        store_tile_moments(moments_ptr, n * tl.num_programs(1) + tl.program_id(1),
                           (tl.num_programs(0) // C) * tl.num_programs(1), C,
                           c + tl.arange(0, 1), tl.arange(0, 1) < 1,
                           acc.to(out_ptr.dtype.element_ty)[:, None], pmask)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + c * scale_stride).to(tl.float32)
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + c * shift_stride).to(tl.float32)
    o_offs = plane.to(tl.int64) * Ho * Wo + offs
    if HAS_RES:
        acc += tl.load(res_ptr + o_offs, mask=pmask, other=0.0).to(tl.float32)
    acc = _activate(acc, ACT)
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _dw_backward_input_kernel(
    gz_ptr, w_ptr, gx_ptr,
    C, H, W, Ho, Wo,
    sgn, sgc, sgh, sgw, swc, swh, sww,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr,
):
    plane = tl.program_id(0)
    n = plane // C
    c = plane % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pmask = offs < H * W
    ih = offs // W
    iw = offs % W
    g_base = gz_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc
    w_base = w_ptr + c.to(tl.int64) * swc
    acc = tl.full([BLOCK], 0.0, tl.float32)
    # Input pixel ih is read by tap i of output row oh iff oh * stride - pad + i * dil == ih.
    for i in tl.static_range(KH):
        th = ih + pad_h - i * dil_h
        # Clamp before dividing: the quotient of a negative th is never used, but keeping the
        # operands non-negative makes // and % agree with floor semantics everywhere.
        thc = tl.maximum(th, 0)
        oh = thc // stride_h
        hmask = pmask & (th >= 0) & (thc - oh * stride_h == 0) & (oh < Ho)
        for j in tl.static_range(KW):
            tw = iw + pad_w - j * dil_w
            twc = tl.maximum(tw, 0)
            ow = twc // stride_w
            m = hmask & (tw >= 0) & (twc - ow * stride_w == 0) & (ow < Wo)
            gv = tl.load(g_base + oh * sgh + ow * sgw, mask=m, other=0.0).to(tl.float32)
            wv = tl.load(w_base + i * swh + j * sww).to(tl.float32)
            acc += gv * wv
    tl.store(gx_ptr + plane.to(tl.int64) * H * W + offs, acc.to(gx_ptr.dtype.element_ty),
             mask=pmask)


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
    cfg = _pick(ho * wo)
    blocks = triton.cdiv(ho * wo, cfg["BLOCK"])
    moments = None
    if stats:
        # Every (image, pixel block, channel) is written by the kernel: no zero fill (an
        # empty output has no rows or no channels, so nothing to fill either).
        moments = torch.empty((3, n * blocks, c), dtype=torch.float32, device=input.device)
    if out.numel() == 0:
        return out, moments
    grid = (n * c, blocks)
    _dw_forward_kernel[grid](
        input, weight, input if bias is None else bias, input if scale is None else scale,
        input if shift is None else shift, input if residual is None else residual, out,
        out if moments is None else moments,
        c, h, w, ho, wo,
        *input.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
        0 if bias is None else bias.stride(0), 0 if scale is None else scale.stride(0),
        0 if shift is None else shift.stride(0),
        *geo,
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, HAS_RES=residual is not None, ACT=activation,
        BLOCK=cfg["BLOCK"], STATS=stats, num_warps=cfg["num_warps"],
    )
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
    ``(z, moments)``: ``moments`` is fp32 ``[3, N * num_pixel_blocks, C]``, planes count,
    mean and M2 (sum of squared deviations from the row's mean), row
    ``n * num_pixel_blocks + b`` those of ``z`` per channel over image ``n``'s ``b``-th block
    of output pixels (``num_pixel_blocks = cdiv(Ho * Wo, BLOCK)``; the last block may be
    shorter). The batch norm merges the rows (``batch_norm_act_from_partials``,
    ``count = N * Ho * Wo``). The statistics are those of ``z`` as stored (rounded to its
    dtype), in fp32, deterministically (no atomics).
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
    cfg = _pick(h * w)
    grid = (n * c, triton.cdiv(h * w, cfg["BLOCK"]))
    _dw_backward_input_kernel[grid](
        grad_z, weight, grad_input, c, h, w, ho, wo,
        *grad_z.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *geo,
        KH=kh, KW=kw, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )
    return grad_input


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
    cfg = _pick(ho * wo)
    taps = _taps_p2(kh, kw)
    pix = max(16, cfg["WTILE"] // taps)
    num_tiles, per_tile = split_tiles(total, c, pix, input.device)
    partials = torch.empty((num_tiles, c, taps), dtype=torch.float32, device=input.device)
    _dw_weight_partials_kernel[(num_tiles, c)](
        grad_z, input, partials, c, h, w, ho, wo, total, per_tile,
        *grad_z.stride(), *input.stride(), *geo,
        KH=kh, KW=kw, TAPS=taps, PIX=pix, num_warps=cfg["num_warps"],
    )
    _dw_weight_reduce_kernel[(c,)](
        partials, grad_weight, c, num_tiles, grad_weight.stride(0), grad_weight.stride(2),
        grad_weight.stride(3), KH=kh, KW=kw, TAPS=taps, BLOCK_T=REDUCE_BLOCK_T, num_warps=1,
    )
    return grad_weight


def aot_cases() -> List[AotCase]:
    """Per dtype, configuration and kernel size (3x3, 5x5): the forward without epilogue,
    with the full one (bias, scale, shift, residual, relu6) and with STATS (bias +
    statistics), the input gradient, and the two weight-gradient stages."""
    cases: List[AotCase] = []
    for dtype in DTYPES:
        ptr = TRITON_PTR[dtype]
        tag = str(dtype).split(".")[-1]
        stats_ptrs = {"moments_ptr": "*fp32"}
        for k in AOT_KERNEL_SIZES:
            taps = _taps_p2(k, k)
            red = dict(KH=k, KW=k, TAPS=taps, BLOCK_T=REDUCE_BLOCK_T)
            cases.append(AotCase(
                f"dw_weight_reduce_{tag}_k{k}", _dw_weight_reduce_kernel,
                aot_signature(_dw_weight_reduce_kernel, ptr, red, {"part_ptr": "*fp32"}), red, 1))
            for cfg in CONFIGS:
                block, warps = cfg["BLOCK"], cfg["num_warps"]
                suffix = f"{tag}_k{k}_b{block}_w{warps}"
                for mode in ("plain", "full", "stats"):
                    full = mode == "full"
                    ce = dict(KH=k, KW=k, HAS_BIAS=mode != "plain", HAS_SCALE=full,
                              HAS_SHIFT=full, HAS_RES=full, ACT=ACT_RELU6 if full else ACT_NONE,
                              BLOCK=block, STATS=mode == "stats")
                    cases.append(AotCase(
                        f"dw_forward_{suffix}_{mode}", _dw_forward_kernel,
                        aot_signature(_dw_forward_kernel, ptr, ce, stats_ptrs), ce, warps))
                ce = dict(KH=k, KW=k, BLOCK=block)
                cases.append(AotCase(
                    f"dw_backward_input_{suffix}", _dw_backward_input_kernel,
                    aot_signature(_dw_backward_input_kernel, ptr, ce), ce, warps))
                pix = max(16, cfg["WTILE"] // taps)
                ce = dict(KH=k, KW=k, TAPS=taps, PIX=pix)
                cases.append(AotCase(
                    f"dw_weight_partials_{tag}_k{k}_t{cfg['WTILE']}_w{warps}",
                    _dw_weight_partials_kernel,
                    aot_signature(_dw_weight_partials_kernel, ptr, ce, {"part_ptr": "*fp32"}),
                    ce, warps))
    # Compilable JITFunctions even when the tests run under the interpreter.
    for case in cases:
        case.fn = compiled(case.fn)
    return cases


__all__ = [
    "CONFIGS",
    "aot_cases",
    "depthwise_conv2d",
    "depthwise_conv2d_backward_input",
    "depthwise_conv2d_backward_weight",
    "depthwise_conv2d_with_stats",
]
