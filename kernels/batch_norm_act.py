"""Triton kernels of switchable batch norm: one width's BN + residual + activation, and its
backward (``slimops::batch_norm_act`` / ``slimops::batch_norm_act_backward``).

The input is viewed as a contiguous ``[N, C, HW]`` tensor (HW = 1 for a 2-D input).

Forward, training mode, three launches:

1. ``_bn_stats_kernel``, grid ``(T, C)``: program (t, c) reduces a fixed range of the
   ``N * HW`` values of channel c and writes fp32 partials ``psum[t, c]``, ``psumsq[t, c]``.
2. ``_bn_finalize_kernel``, one program per block of channels: sums the T partials in a
   fixed order (deterministic: no atomics anywhere) into the batch mean and biased variance,
   and folds the normalisation into ``alpha = weight * invstd``, ``beta = bias - mean * alpha``.
3. The epilogue kernel (``slimops.kernels.epilogue``): ``act(x * alpha[c] + beta[c] + residual)``.

Eval mode skips 1 and reads the running statistics in 2.

Numerics of the statistics: ``E[x^2] - E[x]^2`` in fp32 cancels catastrophically when
``|mean| >> std``. Stage 1 therefore sums *shifted* data ``x - K[c]``, with ``K[c]`` the
channel's first value ``x[0, c, 0]``: the variance is shift invariant, and with a shift
drawn from the data itself ``|mean - K|`` is of the order of the std, so the subtraction
loses only a few bits. Sums accumulate in fp32 lanes (BLOCK partial sums per program, then a
tree reduction), then a tree over tiles, so the rounding error grows like log(count), not
count. ``batch_norm_act_from_partials`` takes *unshifted* partials (plain sums and sums of
squares, which is what a convolution with a statistics epilogue can produce cheaply) and
runs the same finalize with ``K = 0``; its accuracy is that of the producer's sums.

Backward: ``g = grad_out * act'(out)`` (the mask read from the output, as
``epilogue_backward``); two-stage per-channel sums ``sum(g)`` and ``sum(g * (x - mean))``
(``_bn_backward_stats_kernel`` + ``_bn_backward_finalize_kernel``), then
``grad_input = k_g * g + k_x * (x - mean) + k_0`` with, as in csrc/cpu/batch_norm_act.cpp,
``k_g = weight * invstd`` and, in training only (the batch statistics depend on the input),
``k_x = -k_g * invstd^2 * sum(g (x - mean)) / count``, ``k_0 = -k_g * sum(g) / count``.
``grad_weight = sum(g (x - mean)) * invstd``, ``grad_bias = sum(g)``, both of length C.

Dtypes: fp32 / fp16 / bf16 storage, fp32 arithmetic and statistics. Outputs are in the
input's dtype, and so are the returned ``mean``/``var`` and ``grad_weight``/``grad_bias``:
that is what the CPU op returns and what the op's registered fake promises (so the kernels
can serve as the op's CUDA implementation under torch.compile).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

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
    interpreting,
)
from slimops.kernels.epilogue import CONFIGS as EPILOGUE_CONFIGS
from slimops.kernels.epilogue import (
    DTYPES,
    _activation_mask,
    _check_activation,
    _check_vector,
    _sum_combine,
    _epilogue_kernel,
    _flat_block,
    aot_signature,
    compiled,
    epilogue,
    pick_config,
    split_tiles,
)

# Stage-1 reductions and the elementwise backward: values per loop step / per program.
CONFIGS: List[Dict[str, int]] = [
    {"BLOCK": 128, "num_warps": 4},
    {"BLOCK": 512, "num_warps": 4},
    {"BLOCK": 1024, "num_warps": 8},
]

# The finalize kernels: [FINAL_BLOCK_T, FINAL_BLOCK_C] partials per loop step.
FINAL_BLOCK_T = 8
FINAL_BLOCK_C = 64
FINAL_WARPS = 2


def _reduce_config(count: int) -> Dict[str, int]:
    # Under the interpreter the smallest block, so that the small test tensors still split
    # into several tiles.
    return CONFIGS[0] if interpreting() else pick_config(count, CONFIGS)


@triton.jit
def _bn_stats_kernel(
    x_ptr, psum_ptr, psumsq_ptr, C, HW, count, per_tile,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    c = tl.program_id(1)
    # The shift K[c] = x[0, c, 0] (see the module docstring).
    k = tl.load(x_ptr + c.to(tl.int64) * HW).to(tl.float32)
    lo = t * per_tile
    hi = tl.minimum(lo + per_tile, count)
    acc_s = tl.full([BLOCK], 0.0, tl.float32)
    acc_q = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(lo, hi, BLOCK):
        j = start + tl.arange(0, BLOCK)
        m = j < hi
        n = (j // HW).to(tl.int64)
        v = tl.load(x_ptr + (n * C + c) * HW + j % HW, mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, v - k, 0.0)
        acc_s += d
        acc_q += d * d
    tl.store(psum_ptr + t * C + c, tl.reduce(acc_s, 0, _sum_combine))
    tl.store(psumsq_ptr + t * C + c, tl.reduce(acc_q, 0, _sum_combine))


@triton.jit
def _bn_finalize_kernel(
    psum_ptr, psumsq_ptr, shift_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr,
    mean_ptr, var_ptr, alpha_ptr, beta_ptr,
    C, num_tiles, inv_count, eps, shift_stride, rm_stride, rv_stride, w_stride, b_stride,
    TRAINING: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    if TRAINING:
        rows = tl.arange(0, BLOCK_T)
        acc_s = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
        acc_q = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
        # Fixed order over the tiles: bit-identical statistics for identical inputs.
        for t0 in range(0, num_tiles, BLOCK_T):
            t = t0 + rows
            offs = t[:, None] * C + cs[None, :]
            m = (t < num_tiles)[:, None] & cm[None, :]
            acc_s += tl.load(psum_ptr + offs, mask=m, other=0.0)
            acc_q += tl.load(psumsq_ptr + offs, mask=m, other=0.0)
        mean_d = tl.reduce(acc_s, 0, _sum_combine) * inv_count
        # Rounding can leave a tiny negative value for a constant channel.
        var = tl.maximum(tl.reduce(acc_q, 0, _sum_combine) * inv_count - mean_d * mean_d, 0.0)
        mean = mean_d
        if HAS_SHIFT:
            mean += tl.load(shift_ptr + cs.to(tl.int64) * shift_stride, mask=cm,
                            other=0.0).to(tl.float32)
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


def _check_input(input: Tensor, op: str) -> Tuple[int, int, int]:
    if input.dim() < 2:
        raise ValueError(f"slimops.kernels.{op}: input must be [N, C, *], got {tuple(input.shape)}")
    return input.shape[0], input.shape[1], math.prod(input.shape[2:])


def _stride(v: Optional[Tensor]) -> int:
    return 0 if v is None else v.stride(0)


def _finalize_and_apply(
    x: Tensor, hw: int, psum: Optional[Tensor], psumsq: Optional[Tensor], shifted: bool,
    count: int,
    weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], training: bool, eps: float, residual: Optional[Tensor],
    activation: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Stage 2 (statistics -> mean, var, alpha, beta) and the normalise pass."""
    c = x.shape[1]
    dev = x.device
    mean = torch.empty((c,), dtype=x.dtype, device=dev)
    var = torch.empty((c,), dtype=x.dtype, device=dev)
    alpha = torch.empty((c,), dtype=torch.float32, device=dev)
    beta = torch.empty((c,), dtype=torch.float32, device=dev)
    # Absent tensors: dummies of the right dtype, so the signature stays the same.
    f32 = alpha
    num_tiles = 0 if psum is None else psum.shape[0]
    _bn_finalize_kernel[(triton.cdiv(c, FINAL_BLOCK_C),)](
        f32 if psum is None else psum, f32 if psumsq is None else psumsq, x,
        x if running_mean is None else running_mean, x if running_var is None else running_var,
        x if weight is None else weight, x if bias is None else bias,
        mean, var, alpha, beta,
        # 1 / count in Python: exact in double, then one rounding to fp32.
        c, num_tiles, 1.0 / max(count, 1), float(eps), hw,
        _stride(running_mean), _stride(running_var), _stride(weight), _stride(bias),
        TRAINING=training, HAS_SHIFT=shifted, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_T=FINAL_BLOCK_T, BLOCK_C=FINAL_BLOCK_C, num_warps=FINAL_WARPS,
    )
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
    batch statistics (deterministic two-stage reduction), eval with the running ones
    (required then); the running stats are never written (the op is functional: the caller
    folds the returned statistics in). Returns ``(out, mean, var)``: ``out`` contiguous in
    the input's dtype, ``mean``/``var`` (biased) the statistics used, in the input's dtype.
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
    if not training:
        return _finalize_and_apply(x, hw, None, None, False, count, weight, bias, running_mean,
                                   running_var, False, eps, residual, activation)
    cfg = _reduce_config(count)
    num_tiles, per_tile = split_tiles(count, c, cfg["BLOCK"], x.device)
    psum = torch.empty((num_tiles, c), dtype=torch.float32, device=x.device)
    psumsq = torch.empty_like(psum)
    _bn_stats_kernel[(num_tiles, c)](
        x, psum, psumsq, c, hw, count, per_tile, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )
    return _finalize_and_apply(x, hw, psum, psumsq, True, count, weight, bias, None, None, True,
                               eps, residual, activation)


def batch_norm_act_from_partials(
    z: Tensor,
    psum: Tensor,
    psumsq: Tensor,
    count: int,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor],
    activation: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Training-mode ``batch_norm_act`` of ``z [N, C, *]`` from precomputed statistics.

    ``psum``/``psumsq``: fp32 ``[num_tiles, C]`` partial sums and sums of squares of the raw
    (unshifted) values of ``z`` per channel, ``count`` values per channel in all: what a
    convolution with a statistics epilogue writes, so the batch norm does not read ``z`` an
    extra time. Finalises them (fixed-order reduction) into the batch mean and biased
    variance and normalises. Returns ``(out, mean, var)`` as ``batch_norm_act``.
    """
    check_device(z, psum, psumsq, weight, bias, residual)
    n, c, hw = _check_common(z, weight, bias, residual, activation, "batch_norm_act_from_partials")
    for name, p in (("psum", psum), ("psumsq", psumsq)):
        if p.dtype != torch.float32 or p.dim() != 2 or p.shape[1] != c:
            raise ValueError(f"slimops.kernels.batch_norm_act_from_partials: {name} must be fp32 "
                             f"[num_tiles, {c}], got {p.dtype} {tuple(p.shape)}")
    if psum.shape != psumsq.shape:
        raise ValueError("slimops.kernels.batch_norm_act_from_partials: psum and psumsq differ in shape")
    if count <= 1:
        raise ValueError(f"slimops.kernels.batch_norm_act_from_partials: count must be > 1, got {count}")
    return _finalize_and_apply(z.contiguous(), hw, psum.contiguous(), psumsq.contiguous(), False,
                               int(count), weight, bias, None, None, True, eps, residual,
                               activation)


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
    ones in eval); ``out``: the forward's output (the activation's mask is read from it).
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
    num_tiles, per_tile = split_tiles(count, c, cfg["BLOCK"], dev)
    psg = torch.empty((num_tiles, c), dtype=torch.float32, device=dev)
    psgx = torch.empty_like(psg)
    _bn_backward_stats_kernel[(num_tiles, c)](
        go, y, x, mean, psg, psgx, c, hw, count, per_tile, mean.stride(0),
        ACT=activation, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"],
    )
    kg = torch.empty((c,), dtype=torch.float32, device=dev)
    kx = torch.empty_like(kg)
    k0 = torch.empty_like(kg)
    _bn_backward_finalize_kernel[(triton.cdiv(c, FINAL_BLOCK_C),)](
        psg, psgx, x if weight is None else weight, var, grad_weight, grad_bias, kg, kx, k0,
        c, num_tiles, 1.0 / count, float(eps), _stride(weight), var.stride(0),
        TRAINING=training, HAS_W=weight is not None, BLOCK_T=FINAL_BLOCK_T,
        BLOCK_C=FINAL_BLOCK_C, num_warps=FINAL_WARPS,
    )
    numel = x.numel()
    ecfg = pick_config(numel, CONFIGS)
    _bn_backward_apply_kernel[(triton.cdiv(numel, ecfg["BLOCK"]),)](
        go, y, x, mean, kg, kx, k0, grad_input, numel, c, hw, mean.stride(0),
        ACT=activation, TRAINING=training, BLOCK=ecfg["BLOCK"], num_warps=ecfg["num_warps"],
    )
    return grad_input, grad_weight, grad_bias


def aot_cases() -> List[AotCase]:
    """Per dtype: the statistics and backward kernels for every configuration, the finalize
    kernels in training and eval (with and without γ/β), the normalise pass (the epilogue
    kernel with fp32 alpha/beta) without and with residual + relu6, and the backward's
    elementwise pass in training/eval without and with relu6."""
    cases: List[AotCase] = []
    f32 = {"inv_count": "fp32", "psum_ptr": "*fp32", "psumsq_ptr": "*fp32", "alpha_ptr": "*fp32", "beta_ptr": "*fp32",
           "psg_ptr": "*fp32", "psgx_ptr": "*fp32", "kg_ptr": "*fp32", "kx_ptr": "*fp32",
           "k0_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "eps": "fp32"}
    for dtype in DTYPES:
        ptr = TRITON_PTR[dtype]
        tag = str(dtype).split(".")[-1]
        for training in (True, False):
            mode = "train" if training else "eval"
            ce = dict(TRAINING=training, HAS_SHIFT=training, HAS_W=training, HAS_B=training,
                      BLOCK_T=FINAL_BLOCK_T, BLOCK_C=FINAL_BLOCK_C)
            # The finalize reads the shift from x (input dtype), not an fp32 vector.
            sig = aot_signature(_bn_finalize_kernel, ptr, ce, {**f32, "shift_ptr": ptr})
            cases.append(AotCase(f"bn_finalize_{tag}_{mode}", _bn_finalize_kernel, sig, ce,
                                 FINAL_WARPS))
            ce = dict(TRAINING=training, HAS_W=True, BLOCK_T=FINAL_BLOCK_T, BLOCK_C=FINAL_BLOCK_C)
            cases.append(AotCase(
                f"bn_backward_finalize_{tag}_{mode}", _bn_backward_finalize_kernel,
                aot_signature(_bn_backward_finalize_kernel, ptr, ce, f32), ce, FINAL_WARPS))
        # The normalise pass is the epilogue kernel, launched with the epilogue's configs.
        for cfg in EPILOGUE_CONFIGS:
            block, warps = cfg["BLOCK"], cfg["num_warps"]
            for full in (False, True):
                ce = dict(HAS_BIAS=False, HAS_SCALE=True, HAS_SHIFT=True, HAS_RES=full,
                          ACT=ACT_RELU6 if full else ACT_NONE, BLOCK=block)
                cases.append(AotCase(
                    f"bn_apply_{tag}_b{block}_w{warps}_{'res_relu6' if full else 'plain'}",
                    _epilogue_kernel, aot_signature(_epilogue_kernel, ptr, ce, f32), ce, warps))
        for cfg in CONFIGS:
            block, warps = cfg["BLOCK"], cfg["num_warps"]
            suffix = f"{tag}_b{block}_w{warps}"
            ce = dict(BLOCK=block)
            cases.append(AotCase(f"bn_stats_{suffix}", _bn_stats_kernel,
                                 aot_signature(_bn_stats_kernel, ptr, ce, f32), ce, warps))
            for full in (False, True):
                act = ACT_RELU6 if full else ACT_NONE
                ce = dict(ACT=act, BLOCK=block)
                cases.append(AotCase(
                    f"bn_backward_stats_{suffix}_{'relu6' if full else 'plain'}",
                    _bn_backward_stats_kernel,
                    aot_signature(_bn_backward_stats_kernel, ptr, ce, f32), ce, warps))
                for training in (True, False):
                    ce = dict(ACT=act, TRAINING=training, BLOCK=block)
                    cases.append(AotCase(
                        f"bn_backward_apply_{suffix}_{'relu6' if full else 'plain'}_"
                        f"{'train' if training else 'eval'}",
                        _bn_backward_apply_kernel,
                        aot_signature(_bn_backward_apply_kernel, ptr, ce, f32), ce, warps))
    # Compilable JITFunctions even when the tests run under the interpreter.
    for case in cases:
        case.fn = compiled(case.fn)
    return cases


__all__ = [
    "CONFIGS",
    "aot_cases",
    "batch_norm_act",
    "batch_norm_act_backward",
    "batch_norm_act_from_partials",
]
