"""The CUDA kernels' per-element math (csrc/cuda/epilogue_math.cuh), run on the CPU.

The header's functions are ``__host__ __device__`` (``SLIMOPS_HD``, plain ``inline`` under a
host compiler), so csrc/cuda/host_harness.cpp compiles them with g++ into a shared library
whose extern "C" entry points loop over float buffers exactly as the kernels index them. This
module builds that library into a temporary folder and compares it with ``slimops.reference``
and torch autograd: activations and their derivatives, the fused epilogue and its backward, BN
normalisation, the two-stage partial-statistics combine, BN backward, and the depthwise tap
loops on a prefix of a larger weight. No GPU needed; skipped only without g++. When nvcc is
present the same file is also built by nvcc as host code, which adds the fp16 / bf16 paths
(conversions and the depthwise forward on 16-bit buffers).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from slimops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
ACTS = {0: None, 1: "relu", 2: "relu6"}
TOL = dict(rtol=1e-4, atol=1e-5)

P = ctypes.c_void_p
I64 = ctypes.c_int64
INT = ctypes.c_int
F32 = ctypes.c_float
SIGNATURES = {
    "slimops_h_activate": [P, P, I64, INT],
    "slimops_h_activation_grad": [P, P, P, I64, INT],
    "slimops_h_epilogue": [P, P, I64, I64, I64, P, I64, P, I64, P, I64, P, INT],
    "slimops_h_epilogue_backward": [P, P, P, I64, I64, I64, P, I64, INT],
    "slimops_h_bn_apply": [P, P, I64, I64, I64, P, P, P, P, F32, P, INT],
    "slimops_h_bn_stats": [P, P, P, I64, I64, I64, I64, I64],
    "slimops_h_bn_backward": [P, P, P, P, P, P, I64, I64, I64, P, P, P, F32, INT, INT],
    "slimops_h_depthwise_forward": [P, P, P, P, P, I64, I64, P, P, P, P, P, INT],
    "slimops_h_depthwise_backward_input": [P, P, P, P, I64, I64, P],
    "slimops_h_depthwise_backward_weight": [P, P, P, I64, I64, P],
}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"{cxx} not found: cannot build the CUDA host harness")
    so = tmp_path_factory.mktemp("cuda_host_harness") / "libslimops_cuda_host_harness.so"
    cmd = [cxx, "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
           "-I", CSRC, os.path.join(CSRC, "cuda", "host_harness.cpp"), "-o", str(so)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    handle = ctypes.CDLL(str(so))
    for name, args in SIGNATURES.items():
        getattr(handle, name).argtypes = args
        getattr(handle, name).restype = None
    return handle


def _nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def lib16(tmp_path_factory):
    """The same harness built by nvcc as host code: adds the fp16 / bf16 entry points (the
    __half / __nv_bfloat16 conversions), with the no-implicit-half-conversion switches torch's
    CUDAExtension compiles the kernels with."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: cannot build the fp16/bf16 host harness")
    so = tmp_path_factory.mktemp("cuda_host_harness16") / "libslimops_cuda_host_harness16.so"
    cmd = [nvcc, "-std=c++20", "-O2", "-x", "cu", "-shared", "-Xcompiler", "-fPIC", "-I", CSRC,
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           os.path.join(CSRC, "cuda", "host_harness.cpp"), "-o", str(so)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    handle = ctypes.CDLL(str(so))
    assert handle.slimops_h_has_half() == 1
    handle.slimops_h_round.argtypes = [P, P, I64, INT]
    handle.slimops_h_depthwise_forward_16.argtypes = [P, P, P, P, P, I64, I64, P, P, P, P, P,
                                                      INT, INT]
    handle.slimops_h_bn_stats_16.argtypes = [P, P, P, I64, I64, I64, I64, I64, INT]
    for h in (handle.slimops_h_round, handle.slimops_h_depthwise_forward_16,
              handle.slimops_h_bn_stats_16):
        h.restype = None
    return handle


def ptr(t):
    """The address of a float32 (or, for the 16-bit entry points, fp16/bf16) tensor; None for
    an absent optional."""
    if t is None:
        return None
    assert t.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return t.data_ptr()


def i64s(values):
    """An int64 array passed by address (ctypes keeps it alive for the call)."""
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values)


# ---- activations and the epilogue ----------------------------------------------------------


@pytest.mark.parametrize("act", [0, 1, 2])
def test_activation_and_derivative(lib, act):
    x = torch.randn(1000) * 5
    x[:4] = torch.tensor([0.0, 6.0, -0.0, 3.0])
    y = torch.empty_like(x)
    lib.slimops_h_activate(ptr(x), ptr(y), x.numel(), act)
    torch.testing.assert_close(y, reference.activate(x, ACTS[act]), rtol=0, atol=0)

    xl = x.clone().requires_grad_()
    out = reference.activate(xl, ACTS[act])
    g = torch.randn_like(x)
    (expected,) = torch.autograd.grad(out, xl, g)
    dx = torch.empty_like(x)
    lib.slimops_h_activation_grad(ptr(g), ptr(out.detach()), ptr(dx), x.numel(), act)
    torch.testing.assert_close(dx, expected, rtol=0, atol=0)


@pytest.mark.parametrize("act", [1, 2], ids=["relu", "relu6"])
def test_activation_non_finite_follows_torch(lib, act):
    """relu(NaN) is NaN (the kernels' `v > 0 ? v : 0` made it 0), relu6(+-Inf) is 6 / 0; in the
    backward relu passes a NaN output's gradient (threshold_backward) and relu6 zeroes it
    (hardtanh_backward keeps only 0 < out < 6), as the CPU kernels do."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([nan, inf, -inf, 0.0, 3.0, 7.0, -1.0])
    y = torch.empty_like(x)
    lib.slimops_h_activate(ptr(x), ptr(y), x.numel(), act)
    torch.testing.assert_close(y, reference.activate(x, ACTS[act]), rtol=0, atol=0,
                               equal_nan=True)
    out = torch.tensor([nan, inf, 6.0, 0.0, 3.0])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    dx = torch.empty_like(g)
    lib.slimops_h_activation_grad(ptr(g), ptr(out), ptr(dx), g.numel(), act)
    expected = [1.0, 2.0, 3.0, 0.0, 5.0] if act == 1 else [0.0, 0.0, 0.0, 0.0, 5.0]
    torch.testing.assert_close(dx, torch.tensor(expected), rtol=0, atol=0)


def _strided_vector(c):
    """A length-c vector with stride 2 (a view of a bigger buffer, as a parameter view is)."""
    return torch.randn(2 * c + 3)[1 : 1 + 2 * c : 2]


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("terms", ["", "b", "s", "t", "r", "bst", "bstr"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 13), (1, 1, 1, 1)])
def test_epilogue(lib, act, terms, shape):
    z = torch.randn(shape) * 3
    c = shape[1]
    hw = z[0, 0].numel()
    bias = _strided_vector(c) if "b" in terms else None
    scale = torch.rand(c) + 0.5 if "s" in terms else None
    shift = torch.randn(c) if "t" in terms else None
    res = torch.randn(shape) if "r" in terms else None
    out = torch.empty_like(z)
    lib.slimops_h_epilogue(ptr(out), ptr(z), shape[0], c, hw, ptr(bias), 2, ptr(scale), 1,
                           ptr(shift), 1, ptr(res), act)
    torch.testing.assert_close(out, reference.epilogue(z, bias, scale, shift, res, ACTS[act]),
                               **TOL)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("with_scale", [False, True])
def test_epilogue_backward(lib, act, with_scale):
    shape = (2, 5, 3, 4)
    z = (torch.randn(shape) * 4).requires_grad_()
    scale = _strided_vector(5) if with_scale else None
    shift = torch.randn(5)
    out = reference.epilogue(z, None, scale, shift, None, ACTS[act])
    g = torch.randn(shape)
    (expected,) = torch.autograd.grad(out, z, g)
    grad_z = torch.empty(shape)
    lib.slimops_h_epilogue_backward(ptr(grad_z), ptr(g), ptr(out.detach()), 2, 5, 12,
                                    ptr(scale), 2, act)
    torch.testing.assert_close(grad_z, expected, **TOL)


# ---- batch norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (7, 13), (2, 1, 3, 3), (1, 5, 1, 33)])
@pytest.mark.parametrize("blocks,threads", [(1, 1), (1, 32), (3, 8), (5, 256)])
def test_partial_statistics_combine(lib, shape, blocks, threads):
    # Offset data: a naive E[x^2] - E[x]^2 in float32 would lose the variance.
    x = torch.randn(shape) * 0.5 + 100.0
    c = shape[1]
    hw = x[0, 0].numel()
    mean, var = torch.empty(c), torch.empty(c)
    lib.slimops_h_bn_stats(ptr(mean), ptr(var), ptr(x), shape[0], c, hw, blocks, threads)
    dims = [0] + list(range(2, x.dim()))
    x64 = x.double()
    torch.testing.assert_close(mean, x64.mean(dims).float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var, x64.var(dims, unbiased=False).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (6, 7)])
def test_batch_norm_act_forward(lib, act, training, affine, with_residual, shape):
    n, c = shape[:2]
    hw = torch.Size(shape[2:]).numel()
    x = torch.randn(shape) * 2 + 1
    weight = torch.rand(c) + 0.5 if affine else None
    bias = torch.randn(c) if affine else None
    res = torch.randn(shape) if with_residual else None
    eps = 1e-5
    if training:
        mean, var = torch.empty(c), torch.empty(c)
        lib.slimops_h_bn_stats(ptr(mean), ptr(var), ptr(x), n, c, hw, 2, 16)
        rm = rv = None
    else:
        mean, var = torch.randn(c), torch.rand(c) + 0.5
        rm, rv = mean.clone(), var.clone()
    out = torch.empty(shape)
    lib.slimops_h_bn_apply(ptr(out), ptr(x), n, c, hw, ptr(mean), ptr(var), ptr(weight),
                           ptr(bias), eps, ptr(res), act)
    expected = reference.batch_norm_act(x, weight, bias, rm, rv, training, 0.1, eps, res,
                                        ACTS[act])
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (6, 7)])
def test_batch_norm_act_backward(lib, act, training, affine, shape):
    n, c = shape[:2]
    hw = torch.Size(shape[2:]).numel()
    eps = 1e-5
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    weight = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    bias = torch.randn(c, dtype=torch.float64).requires_grad_() if affine else None
    if training:
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.detach().mean(dims), x.detach().var(dims, unbiased=False)
        rm = rv = None
    else:
        mean = torch.randn(c, dtype=torch.float64)
        var = torch.rand(c, dtype=torch.float64) + 0.5
        rm, rv = mean.clone(), var.clone()
    out = reference.batch_norm_act(x, weight, bias, rm, rv, training, 0.1, eps, None, ACTS[act])
    g = torch.randn(shape, dtype=torch.float64)
    wrt = [x] + ([weight, bias] if affine else [])
    expected = torch.autograd.grad(out, wrt, g)

    # float32 copies held in names: a temporary's buffer would be freed before the call.
    g32, x32, out32, w32, mean32, var32 = (
        None if t is None else t.detach().float().contiguous()
        for t in (g, x, out, weight, mean, var))
    gi, gw, gb = torch.empty(shape), torch.empty(c), torch.empty(c)
    lib.slimops_h_bn_backward(ptr(gi), ptr(gw), ptr(gb), ptr(g32), ptr(x32), ptr(out32), n, c,
                              hw, ptr(w32), ptr(mean32), ptr(var32), eps, int(training), act)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gi, expected[0].float(), **tol)
    if affine:
        torch.testing.assert_close(gw, expected[1].float(), **tol)
        torch.testing.assert_close(gb, expected[2].float(), **tol)


# ---- depthwise convolution -----------------------------------------------------------------


def _geom(h, w, kh, kw, stride, padding, dilation):
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return i64s([h, w, kh, kw, oh, ow, *stride, *padding, *dilation]), (oh, ow)


# (H, W, kernel, stride, padding, dilation)
DW_CASES = [
    (7, 7, (3, 3), (1, 1), (1, 1), (1, 1)),
    (8, 9, (3, 3), (2, 2), (1, 1), (1, 1)),
    (13, 11, (5, 5), (1, 2), (2, 2), (1, 1)),
    (9, 9, (3, 3), (1, 1), (2, 2), (2, 2)),
    (6, 10, (3, 5), (2, 1), (0, 2), (1, 2)),
    (5, 5, (3, 3), (3, 3), (0, 0), (1, 1)),
    (1, 1, (3, 3), (1, 1), (1, 1), (1, 1)),
    (4, 4, (1, 1), (2, 2), (0, 0), (1, 1)),
]


@pytest.mark.parametrize("case", DW_CASES)
@pytest.mark.parametrize("c,c_full", [(3, 8), (8, 8), (1, 5)])
@pytest.mark.parametrize("epi", ["", "bias", "bstr-relu6", "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_depthwise_forward_on_weight_prefix(lib, case, c, c_full, epi, layout):
    h, w, (kh, kw), stride, padding, dilation = case
    n = 2
    weight = torch.randn(c_full, 1, kh, kw)
    x = torch.randn(n, c, h, w)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    geom, (oh, ow) = _geom(h, w, kh, kw, stride, padding, dilation)
    bias = torch.randn(c_full) if "b" in epi else None
    scale = torch.rand(c) + 0.5 if "s" in epi else None
    shift = torch.randn(c) if "t" in epi else None
    res = torch.randn(n, c, oh, ow) if "r" in epi else None
    act = 2 if "relu6" in epi else (1 if "relu" in epi else 0)
    out = torch.empty(n, c, oh, ow)
    lib.slimops_h_depthwise_forward(ptr(out), ptr(x), i64s(x.stride()), ptr(weight),
                                    i64s(weight.stride()), n, c, geom, ptr(bias),
                                    ptr(scale), ptr(shift), ptr(res), act)
    expected = reference.depthwise_conv2d(x, weight, bias, stride, padding, dilation, scale,
                                          shift, res, ACTS[act])
    torch.testing.assert_close(out, expected, **TOL)


def test_depthwise_forward_reads_weight_through_strides(lib):
    # The weight itself a strided view (every other channel of a bigger tensor): the tap loop
    # must use the strides, not assume a packed [C_full, 1, kh, kw].
    big = torch.randn(12, 1, 3, 3)
    weight = big[::2]
    x = torch.randn(1, 4, 6, 6)
    geom, (oh, ow) = _geom(6, 6, 3, 3, (1, 1), (1, 1), (1, 1))
    out = torch.empty(1, 4, oh, ow)
    lib.slimops_h_depthwise_forward(ptr(out), ptr(x), i64s(x.stride()), ptr(weight),
                                    i64s(weight.stride()), 1, 4, geom, None, None,
                                    None, None, 0)
    expected = reference.depthwise_conv2d(x, weight.contiguous(), None, 1, 1, 1)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("case", DW_CASES)
@pytest.mark.parametrize("c,c_full", [(3, 8), (4, 4)])
def test_depthwise_backward_on_weight_prefix(lib, case, c, c_full):
    h, w, (kh, kw), stride, padding, dilation = case
    n = 2
    weight = torch.randn(c_full, 1, kh, kw, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    geom, (oh, ow) = _geom(h, w, kh, kw, stride, padding, dilation)
    out = reference.depthwise_conv2d(x, weight, None, stride, padding, dilation)
    g = torch.randn(n, c, oh, ow, dtype=torch.float64)
    gx_ref, gw_ref = torch.autograd.grad(out, [x, weight], g)

    wf, xf, gf = weight.detach().float(), x.detach().float(), g.float()
    gx = torch.empty(n, c, h, w)
    lib.slimops_h_depthwise_backward_input(ptr(gx), ptr(gf), ptr(wf), i64s(wf.stride()), n,
                                           c, geom)
    torch.testing.assert_close(gx, gx_ref.float(), **TOL)
    # Full weight shape, rows past C zero (what the op returns so autograd accumulates as is).
    gw = torch.zeros(c_full, 1, kh, kw)
    lib.slimops_h_depthwise_backward_weight(ptr(gw), ptr(gf), ptr(xf), n, c, geom)
    torch.testing.assert_close(gw, gw_ref.float(), rtol=1e-4, atol=1e-4)
    assert gw[c:].abs().sum() == 0


# ---- fp16 / bf16 (harness built by nvcc as host code) ---------------------------------------

HALF = {"float16": (torch.float16, 0), "bfloat16": (torch.bfloat16, 1)}


@pytest.mark.parametrize("dtype", HALF)
def test_half_conversions_round_like_torch(lib16, dtype):
    tdtype, bf16 = HALF[dtype]
    x = torch.cat([torch.randn(4000) * 10, torch.randn(1000) * 1e-4,
                   torch.tensor([0.0, -0.0, 1.0, 65504.0, 3.3895e38, 1e-8])])
    y = torch.empty_like(x)
    lib16.slimops_h_round(ptr(x), ptr(y), x.numel(), bf16)
    torch.testing.assert_close(y, x.to(tdtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", DW_CASES[:5])
@pytest.mark.parametrize("epi", ["", "bstr-relu6"])
def test_depthwise_forward_half(lib16, dtype, case, epi):
    tdtype, bf16 = HALF[dtype]
    h, w, (kh, kw), stride, padding, dilation = case
    n, c, c_full = 2, 3, 8
    weight = torch.randn(c_full, 1, kh, kw).to(tdtype)
    x = torch.randn(n, c, h, w).to(tdtype)
    geom, (oh, ow) = _geom(h, w, kh, kw, stride, padding, dilation)
    bias = torch.randn(c_full).to(tdtype) if "b" in epi else None
    scale = (torch.rand(c) + 0.5).to(tdtype) if "s" in epi else None
    shift = torch.randn(c).to(tdtype) if "t" in epi else None
    res = torch.randn(n, c, oh, ow).to(tdtype) if "r" in epi else None
    act = 2 if "relu6" in epi else 0
    out = torch.empty(n, c, oh, ow, dtype=tdtype)
    lib16.slimops_h_depthwise_forward_16(ptr(out), ptr(x), i64s(x.stride()), ptr(weight),
                                         i64s(weight.stride()), n, c, geom, ptr(bias),
                                         ptr(scale), ptr(shift), ptr(res), act, bf16)
    # The oracle in float32 on the same 16-bit values, rounded once at the end, as the
    # kernel accumulates in float and stores once.
    f = lambda t: None if t is None else t.float()  # noqa: E731
    expected = reference.depthwise_conv2d(f(x), f(weight), f(bias), stride, padding, dilation,
                                          f(scale), f(shift), f(res), ACTS[act]).to(tdtype)
    tol = dict(rtol=1e-2, atol=1e-2) if bf16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, expected, **tol)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("blocks,threads", [(1, 32), (5, 256)])
def test_batch_statistics_of_half_input_are_float32(lib16, dtype, blocks, threads):
    """Issue 17: the CUDA kernel's statistics of a float16 / bfloat16 input are float32 (the
    forward's mean_out / var_out, bn_finalize_kernel); at |mean| / std = 100 the variance
    is within 1e-5 (relative) of float64's over the same stored 16-bit values, which a
    16-bit variance (rounding alone: 4.9e-4 for float16) could not be."""
    tdtype, bf16 = HALF[dtype]
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 3, 30, 30, generator=g) * 8.0 + 800.0).to(tdtype)
    xd = x.double()
    want_mean, want_var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    assert float((want_mean.abs() / want_var.sqrt()).min()) > 90
    mean, var = torch.empty(3), torch.empty(3)  # float32: what the kernel writes
    lib16.slimops_h_bn_stats_16(ptr(mean), ptr(var), ptr(x), 4, 3, 900, blocks, threads, bf16)
    assert float(((var.double() - want_var) / want_var).abs().max()) < 1e-5
    assert float(((mean.double() - want_mean) / want_mean).abs().max()) < 1e-6
