"""Switchable batch norm's Triton kernels (``slimops.kernels.batch_norm_act``) against
``slimops.reference.batch_norm_act``, autograd of it, and the registered CPU op.

Without a GPU they run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). bf16 runs too, as storage (these kernels compute in fp32 and use no
tl.dot, whose bf16 interpreter result is wrong), at a tolerance that allows for the
interpreter's bf16 conversions, which need not round like the GPU's; bf16 is also compiled.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slimops import reference  # noqa: E402
from slimops.ops import _backend  # noqa: E402
from slimops.kernels import _aot  # noqa: E402
from slimops.kernels import batch_norm_act as K  # noqa: E402
from slimops.ops._common import ACTIVATION_NAMES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 runs in the interpreter here: these kernels use no tl.dot (only its dot is wrong).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
EPS = 1e-5
# 4-D, 2-D (HW = 1), 3-D, odd sizes; (2, 3, 16, 16) splits into several tiles per channel.
SHAPES = [(2, 5, 9, 7), (7, 13), (2, 3, 7), (1, 1, 3, 3), (2, 16, 9, 9), (2, 3, 16, 16)]
CPU_OP = _backend.HAS_C and DEVICE == "cpu"


def _params(c: int, full: int, dtype=torch.float32):
    """γ, β, running mean, running var of the active width: prefix views of full-width
    buffers (``full > c``) or whole ones, read in place through their strides."""
    def vec(make):
        return make(full).to(DEVICE, dtype)[:c]

    return (vec(lambda n: torch.rand(n) * 2 + 0.5), vec(torch.randn), vec(torch.randn),
            vec(lambda n: torch.rand(n) + 0.5))


def _ref_forward(x, w, b, rm, rv, training, residual, act):
    """Reference output and statistics, in fp32 (running stats cloned: the reference
    updates them in place)."""
    f = lambda t: None if t is None else t.float()  # noqa: E731
    rm_c, rv_c = f(rm).clone(), f(rv).clone()
    out = reference.batch_norm_act(f(x), f(w), f(b), rm_c, rv_c, training, 0.1, EPS, f(residual),
                                   ACTIVATION_NAMES[act])
    if training:
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.float().mean(dims), x.float().var(dims, unbiased=False)
    else:
        mean, var = f(rm), f(rv)
    return out, mean, var


@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(shape, training, activation, residual):
    c = shape[1]
    x = torch.randn(shape, device=DEVICE) * 2 + 1
    w, b, rm, rv = _params(c, c + 3 if c % 2 else c)
    res = torch.randn(shape, device=DEVICE) if residual else None
    out, mean, var = K.batch_norm_act(x, w, b, rm, rv, training, EPS, res, activation)
    e_out, e_mean, e_var = _ref_forward(x, w, b, rm, rv, training, res, activation)
    assert out.dtype == x.dtype and mean.dtype == x.dtype and var.dtype == x.dtype
    assert mean.shape == (c,) and var.shape == (c,)
    torch.testing.assert_close(out, e_out, **TOL[torch.float32])
    torch.testing.assert_close(mean, e_mean, **TOL[torch.float32])
    torch.testing.assert_close(var, e_var, **TOL[torch.float32])
    if CPU_OP:
        cpu = torch.ops.slimops.batch_norm_act(x, w, b, rm, rv, training, EPS, res, activation)
        for got, want in zip((out, mean, var), cpu):
            torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("affine", [False, True], ids=["no_affine", "affine"])
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 5, 9, 7), (7, 13), (2, 3, 16, 16)], ids=str)
def test_backward_matches_autograd_and_cpu_op(shape, training, activation, affine):
    c = shape[1]
    x = torch.randn(shape, device=DEVICE) * 2 + 1
    w, b, rm, rv = _params(c, c + 2)
    if not affine:
        w = b = None
    res = torch.randn(shape, device=DEVICE)
    out, mean, var = K.batch_norm_act(x, w, b, rm, rv, training, EPS, res, activation)
    grad_out = torch.randn(shape, device=DEVICE)
    grad_input, grad_weight, grad_bias = K.batch_norm_act_backward(
        grad_out, x, out, w, mean, var, EPS, training, activation)
    assert grad_weight.shape == (c,) and grad_bias.shape == (c,)

    xr = x.clone().requires_grad_()
    wr = None if w is None else w.detach().clone().requires_grad_()
    br = None if b is None else b.detach().clone().requires_grad_()
    reference.batch_norm_act(xr, wr, br, rm.clone(), rv.clone(), training, 0.1, EPS, res,
                             ACTIVATION_NAMES[activation]).backward(grad_out)
    tol = TOL[torch.float32]
    torch.testing.assert_close(grad_input, xr.grad, **tol)
    if affine:
        torch.testing.assert_close(grad_weight, wr.grad, **tol)
        torch.testing.assert_close(grad_bias, br.grad, **tol)
    if CPU_OP:
        cpu = torch.ops.slimops.batch_norm_act_backward(
            grad_out, x, out, w, mean, var, EPS, training, activation)
        for got, want in zip((grad_input, grad_weight, grad_bias), cpu):
            torch.testing.assert_close(got, want, **tol)


def _tile_partials(z: torch.Tensor, tiles: int):
    """Plain (unshifted) per-tile sums and sums of squares, [tiles, C] fp32: what a
    convolution with a statistics epilogue hands over."""
    c = z.shape[1]
    per_channel = z.float().transpose(0, 1).reshape(c, -1)
    chunks = per_channel.tensor_split(tiles, dim=1)
    psum = torch.stack([ch.sum(1) for ch in chunks])
    psumsq = torch.stack([(ch * ch).sum(1) for ch in chunks])
    return psum.contiguous(), psumsq.contiguous(), per_channel.shape[1]


@pytest.mark.parametrize("tiles", [1, 3, 13])
@pytest.mark.parametrize("activation", [0, 2])
@pytest.mark.parametrize("shape", [(2, 7, 9, 9), (13, 3)], ids=str)
def test_from_partials_matches_batch_statistics(shape, activation, tiles):
    c = shape[1]
    z = torch.randn(shape, device=DEVICE) * 1.5 - 0.5
    w, b, _, _ = _params(c, c + 1)
    res = torch.randn(shape, device=DEVICE) if activation else None
    psum, psumsq, count = _tile_partials(z, tiles)
    out, mean, var = K.batch_norm_act_from_partials(z, psum, psumsq, count, w, b, EPS, res,
                                                    activation)
    expected = F.batch_norm(z, None, None, w, b, True, 0.0, EPS)
    if res is not None:
        expected = expected + res
    expected = reference.activate(expected, ACTIVATION_NAMES[activation])
    dims = [0] + list(range(2, z.dim()))
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    torch.testing.assert_close(mean, z.mean(dims), **TOL[torch.float32])
    torch.testing.assert_close(var, z.var(dims, unbiased=False), **TOL[torch.float32])
    # the same as the op's own two-stage statistics
    out2, _, _ = K.batch_norm_act(z, w, b, None, None, True, EPS, res, activation)
    torch.testing.assert_close(out, out2, **TOL[torch.float32])


def test_variance_survives_a_large_mean():
    # |mean| / std = 1e3: E[x^2] - E[x]^2 in fp32 would lose every digit; the shifted sums
    # (module docstring) keep the variance to fp32 accuracy.
    x = torch.randn(2, 4, 16, 16, device=DEVICE, dtype=torch.float64) * 0.5 + 500.0
    x32 = x.float()
    _, mean, var = K.batch_norm_act(x32, None, None, None, None, True, EPS, None, 0)
    dims = [0, 2, 3]
    want = x32.double().var(dims, unbiased=False)
    torch.testing.assert_close(var.double(), want, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), x32.double().mean(dims), rtol=1e-6, atol=0)


def test_statistics_are_deterministic():
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    a = K.batch_norm_act(x, None, None, None, None, True, EPS, None, 1)
    b = K.batch_norm_act(x, None, None, None, None, True, EPS, None, 1)
    g = torch.randn_like(x)
    ga = K.batch_norm_act_backward(g, x, a[0], None, a[1], a[2], EPS, True, 1)
    gb = K.batch_norm_act_backward(g, x, b[0], None, b[1], b[2], EPS, True, 1)
    for u, v in zip(a + ga, b + gb):
        assert torch.equal(u, v)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 5, 9, 7), (7, 13)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_fp32_reference(dtype, shape, training):
    c = shape[1]
    x = (torch.randn(shape, device=DEVICE) * 2 + 1).to(dtype)
    w, b, rm, rv = _params(c, c + 2, dtype)
    res = torch.randn(shape, device=DEVICE).to(dtype)
    out, mean, var = K.batch_norm_act(x, w, b, rm, rv, training, EPS, res, 2)
    e_out, e_mean, e_var = _ref_forward(x, w, b, rm, rv, training, res, 2)
    assert out.dtype == dtype and mean.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), e_out.to(dtype).float(), **tol)
    torch.testing.assert_close(mean.float(), e_mean.to(dtype).float(), **tol)
    torch.testing.assert_close(var.float(), e_var.to(dtype).float(), **tol)

    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    gi, gw, gb = K.batch_norm_act_backward(grad_out, x, out, w, mean, var, EPS, training, 2)
    assert gi.dtype == dtype and gw.dtype == dtype
    # Reference backward in fp32 through the fp16 kernel's own mask (out in (0, 6)): rounding
    # the output to fp16 can move it onto a clamp edge.
    xr = x.float().requires_grad_()
    wr = w.float().requires_grad_()
    br = b.float().requires_grad_()
    y = reference.batch_norm_act(xr, wr, br, rm.float().clone(), rv.float().clone(), training,
                                 0.1, EPS, res.float(), None)
    o = out.float()
    y.backward(grad_out.float() * ((o > 0) & (o < 6)))
    torch.testing.assert_close(gi.float(), xr.grad.to(dtype).float(), **tol)
    torch.testing.assert_close(gw.float(), wr.grad.to(dtype).float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gb.float(), br.grad.to(dtype).float(), **tol)


def test_bad_arguments_raise():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError):  # eval needs running stats
        K.batch_norm_act(x, None, None, None, None, False, EPS, None, 0)
    with pytest.raises(ValueError):  # one value per channel cannot be normalised
        K.batch_norm_act(x[:1, :, :1, :1], None, None, None, None, True, EPS, None, 0)
    with pytest.raises(ValueError):
        K.batch_norm_act(x, torch.ones(4, device=DEVICE), None, None, None, True, EPS, None, 0)
    with pytest.raises(ValueError):
        K.batch_norm_act_from_partials(x, torch.zeros(2, 3, dtype=torch.float64, device=DEVICE),
                                       torch.zeros(2, 3, device=DEVICE), 32, None, None, EPS,
                                       None, 0)


def test_aot_representative_case_has_no_spills():
    cases = {c.name: c for c in K.aot_cases()}
    for name in ("bn_stats_float32_b512_w4", "bn_finalize_float32_train"):
        r = _aot.compile_case(cases[name], 90)
        assert r.registers > 0
        assert r.spill_bytes == 0 and r.stack_bytes == 0, name


def test_bf16_compiles():
    # Compile-only: the interpreter's bf16 arithmetic is not the GPU's.
    cases = {c.name: c for c in K.aot_cases()}
    for name in ("bn_stats_bfloat16_b1024_w8", "bn_apply_bfloat16_b1024_w4_res_relu6",
                 "bn_backward_stats_bfloat16_b1024_w8_relu6",
                 "bn_backward_finalize_bfloat16_train",
                 "bn_backward_apply_bfloat16_b1024_w8_relu6_train"):
        r = _aot.compile_case(cases[name], 90)
        assert r.registers > 0 and r.spill_bytes == 0 and r.stack_bytes == 0, name


def test_past_32_bit_offsets_raises_before_launch():
    """Issue 14, item 2: the statistics and backward kernels walk a channel's N*H*W values
    with one 32-bit index; past 2^31 they raise before copying or launching anything (a
    zero-stride view: no memory behind it)."""
    x = torch.empty(1, 1, 1, 1, device=DEVICE).expand(2 ** 16, 2, 2 ** 8, 2 ** 8)
    w, b = torch.ones(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match="values_per_channel .* 32-bit offsets"):
        K.batch_norm_act(x, w, b, None, None, True, 1e-5, None, 0)
    stats = torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match="values_per_channel .* 32-bit offsets"):
        K.batch_norm_act_backward(x, x, x, w, stats, stats + 1, 1e-5, True, 0)
