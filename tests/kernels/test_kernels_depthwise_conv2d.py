"""The depthwise convolution's Triton kernels (``slimops.kernels.depthwise_conv2d``) against
``slimops.reference`` (forward) and autograd of the reference on the sliced weight (backward).

Without a GPU they run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); sizes stay small (N <= 2, H, W <= 9, C <= 16) so that stays fast.
bf16 runs too, as storage (these kernels compute in fp32 and use no
tl.dot, whose bf16 interpreter result is wrong), at a tolerance that allows for the
interpreter's bf16 conversions, which need not round like the GPU's; bf16 is also compiled.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from slimops import reference  # noqa: E402
from slimops.ops import _backend  # noqa: E402
from slimops.kernels import _aot  # noqa: E402
from slimops.kernels import depthwise_conv2d as K  # noqa: E402
from slimops.ops._common import ACTIVATION_NAMES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_OP = _backend.HAS_C and DEVICE == "cpu"
# bf16 runs in the interpreter here: these kernels use no tl.dot (only its dot is wrong).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

# (kernel, stride, padding, dilation, H, W): strides 1/2, paddings 0/1/2, dilations 1/2,
# 3x3 and 5x5, odd and tiny planes.
GEOMETRIES = [
    (3, 1, 1, 1, 9, 9),
    (3, 2, 1, 1, 9, 7),
    (3, 1, 0, 1, 3, 3),
    (3, 2, 2, 2, 7, 9),
    (3, 1, 2, 2, 1, 1),
    (5, 1, 2, 1, 7, 7),
    (5, 2, 0, 1, 9, 8),
    (5, 1, 1, 2, 9, 9),
]
# (active channels, full channels): a prefix of the shared weight, and the full width.
WIDTHS = [(5, 13), (7, 7)]


def _geo_id(g):
    return "k{}s{}p{}d{}_{}x{}".format(*g)


def _make(geo, width, dtype=torch.float32, n=2):
    k, s, p, d, h, w = geo
    c, c_full = width
    x = torch.randn(n, c, h, w, device=DEVICE).to(dtype)
    weight = torch.randn(c_full, 1, k, k, device=DEVICE).to(dtype)
    return x, weight, [s, s], [p, p], [d, d]


def _f(t):
    return None if t is None else t.float()


@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "full_relu6"])
@pytest.mark.parametrize("width", WIDTHS, ids=str)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=_geo_id)
def test_forward_matches_reference(geo, width, epilogue):
    x, weight, s, p, d = _make(geo, width)
    c, c_full = width
    bias = scale = shift = residual = None
    act = 0
    if epilogue:
        bias = torch.randn(c_full, device=DEVICE)
        scale, shift = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)
        act = 2
    expected = reference.depthwise_conv2d(x, weight, bias, s, p, d, scale, shift, None,
                                          ACTIVATION_NAMES[act])
    if epilogue:
        residual = torch.randn_like(expected)
        expected = reference.depthwise_conv2d(x, weight, bias, s, p, d, scale, shift, residual,
                                              ACTIVATION_NAMES[act])
    out = K.depthwise_conv2d(x, weight, bias, s, p, d, scale, shift, residual, act)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    if CPU_OP:
        cpu = torch.ops.slimops.depthwise_conv2d(x, weight, bias, s, p, d, scale, shift,
                                                 residual, act)
        torch.testing.assert_close(out, cpu, **TOL[torch.float32])


@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("terms", ["bias", "scale", "shift_residual", "all"])
def test_forward_epilogue_terms(terms, activation):
    x, weight, s, p, d = _make(GEOMETRIES[1], (3, 16))
    c, c_full = 3, 16
    bias = torch.randn(c_full, device=DEVICE) if terms in ("bias", "all") else None
    # scale as a strided view: per-channel vectors are read through their strides
    scale = (torch.randn(2 * c, device=DEVICE)[::2] * 2) if terms in ("scale", "all") else None
    shift = torch.randn(c, device=DEVICE) if terms in ("shift_residual", "all") else None
    z = reference.depthwise_conv2d(x, weight, None, s, p, d)
    residual = torch.randn_like(z) * 3 if terms in ("shift_residual", "all") else None
    expected = reference.depthwise_conv2d(x, weight, bias, s, p, d, scale, shift, residual,
                                          ACTIVATION_NAMES[activation])
    out = K.depthwise_conv2d(x, weight, bias, s, p, d, scale, shift, residual, activation)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_forward_reads_strided_input_and_weight_in_place():
    # The input as a channel prefix of a wider activation (non-contiguous), the weight as a
    # [C_full, 1, k, k] view with a non-packed channel stride: both are read through their
    # strides, nothing is copied.
    wide = torch.randn(2, 11, 9, 9, device=DEVICE)
    x = wide[:, :6]
    storage = torch.randn(13, 2, 3, 3, device=DEVICE)
    weight = storage[:, :1]
    assert not x.is_contiguous() and not weight.is_contiguous()
    expected = reference.depthwise_conv2d(x, weight, None, 2, 1, 1)
    out = K.depthwise_conv2d(x, weight, None, [2, 2], [1, 1], [1, 1], None, None, None, 0)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    gz = torch.randn_like(out)
    gw = K.depthwise_conv2d_backward_weight(gz, x, weight, [2, 2], [1, 1], [1, 1])
    w = weight.detach().clone().requires_grad_()
    reference.depthwise_conv2d(x, w, None, 2, 1, 1).backward(gz)
    torch.testing.assert_close(gw, w.grad, **TOL[torch.float32])


@pytest.mark.parametrize("width", WIDTHS, ids=str)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=_geo_id)
def test_backward_matches_autograd(geo, width):
    x, weight, s, p, d = _make(geo, width)
    c = width[0]
    xr = x.clone().requires_grad_()
    wr = weight.clone().requires_grad_()
    z = reference.depthwise_conv2d(xr, wr, None, s, p, d)
    grad_z = torch.randn_like(z)
    z.backward(grad_z)
    grad_input = K.depthwise_conv2d_backward_input(grad_z, weight, list(x.shape), s, p, d)
    grad_weight = K.depthwise_conv2d_backward_weight(grad_z, x, weight, s, p, d)
    torch.testing.assert_close(grad_input, xr.grad, **TOL[torch.float32])
    assert grad_weight.shape == weight.shape and grad_weight.dtype == weight.dtype
    torch.testing.assert_close(grad_weight, wr.grad, **TOL[torch.float32])
    # past the active width: exactly zero (autograd accumulates the full-size gradient)
    assert torch.count_nonzero(grad_weight[c:]) == 0
    if CPU_OP:  # the registered CPU ops, called with the same (schema) arguments
        torch.testing.assert_close(
            grad_input, torch.ops.slimops.depthwise_conv2d_backward_input(
                grad_z, weight, list(x.shape), s, p, d), **TOL[torch.float32])
        torch.testing.assert_close(
            grad_weight, torch.ops.slimops.depthwise_conv2d_backward_weight(
                grad_z, x, weight, s, p, d), **TOL[torch.float32])


@pytest.mark.parametrize("geo", [GEOMETRIES[0], GEOMETRIES[6]], ids=_geo_id)
def test_single_channel_of_three(geo):
    x, weight, s, p, d = _make(geo, (1, 3), n=1)
    xr = x.clone().requires_grad_()
    wr = weight.clone().requires_grad_()
    z = reference.depthwise_conv2d(xr, wr, None, s, p, d, activation="relu")
    grad = torch.randn_like(z)
    z.backward(grad)
    out = K.depthwise_conv2d(x, weight, None, s, p, d, None, None, None, 1)
    torch.testing.assert_close(out, z.detach(), **TOL[torch.float32])
    grad_z = grad * (out > 0)
    torch.testing.assert_close(
        K.depthwise_conv2d_backward_input(grad_z, weight, list(x.shape), s, p, d), xr.grad,
        **TOL[torch.float32])
    grad_weight = K.depthwise_conv2d_backward_weight(grad_z, x, weight, s, p, d)
    torch.testing.assert_close(grad_weight, wr.grad, **TOL[torch.float32])
    assert torch.count_nonzero(grad_weight[1:]) == 0


def test_weight_gradient_is_deterministic():
    x, weight, s, p, d = _make(GEOMETRIES[0], (16, 16))
    grad_z = torch.randn(2, 16, 9, 9, device=DEVICE)
    a = K.depthwise_conv2d_backward_weight(grad_z, x, weight, s, p, d)
    b = K.depthwise_conv2d_backward_weight(grad_z, x, weight, s, p, d)
    assert torch.equal(a, b)


@pytest.mark.parametrize("geo", [GEOMETRIES[1], GEOMETRIES[5]], ids=_geo_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_fp32_reference(dtype, geo):
    x, weight, s, p, d = _make(geo, (5, 13), dtype)
    c = 5
    bias = torch.randn(13, device=DEVICE).to(dtype)
    scale = torch.rand(c, device=DEVICE).to(dtype) + 0.5
    shift = torch.randn(c, device=DEVICE).to(dtype)
    z32 = reference.depthwise_conv2d(x.float(), weight.float(), None, s, p, d)
    residual = torch.randn_like(z32).to(dtype)
    expected = reference.depthwise_conv2d(x.float(), weight.float(), bias.float(), s, p, d,
                                          scale.float(), shift.float(), residual.float(), "relu6")
    out = K.depthwise_conv2d(x, weight, bias, s, p, d, scale, shift, residual, 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), **TOL[dtype])

    xr = x.float().requires_grad_()
    wr = weight.float().requires_grad_()
    grad_z = torch.randn_like(z32).to(dtype)
    reference.depthwise_conv2d(xr, wr, None, s, p, d).backward(grad_z.float())
    grad_input = K.depthwise_conv2d_backward_input(grad_z, weight, list(x.shape), s, p, d)
    grad_weight = K.depthwise_conv2d_backward_weight(grad_z, x, weight, s, p, d)
    assert grad_input.dtype == dtype and grad_weight.dtype == dtype
    torch.testing.assert_close(grad_input.float(), xr.grad.to(dtype).float(), **TOL[dtype])
    torch.testing.assert_close(grad_weight.float(), wr.grad.to(dtype).float(), **TOL[dtype])
    assert torch.count_nonzero(grad_weight[c:]) == 0


def test_bad_arguments_raise():
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    weight = torch.randn(3, 1, 3, 3, device=DEVICE)  # narrower than the input
    with pytest.raises(ValueError):
        K.depthwise_conv2d(x, weight, None, [1, 1], [0, 0], [1, 1], None, None, None, 0)
    weight = torch.randn(4, 1, 7, 7, device=DEVICE)  # bigger than the plane
    with pytest.raises(ValueError):
        K.depthwise_conv2d(x, weight, None, [1, 1], [0, 0], [1, 1], None, None, None, 0)
    weight = torch.randn(4, 1, 3, 3, device=DEVICE)
    with pytest.raises(ValueError):
        K.depthwise_conv2d(x, weight, None, [1, 1], [0, 0], [1, 1], None, None, None, 5)
    with pytest.raises(ValueError):
        K.depthwise_conv2d(x, weight, torch.randn(3, device=DEVICE), [1, 1], [0, 0], [1, 1],
                           None, None, None, 0)


def test_aot_representative_case_has_no_spills():
    case = next(c for c in K.aot_cases() if c.name == "dw_forward_float32_k3_s1_v4_full")
    r = _aot.compile_case(case, 90)
    assert r.registers > 0
    assert r.spill_bytes == 0 and r.stack_bytes == 0


def test_bf16_compiles():
    # Compile-only: the interpreter's bf16 arithmetic is not the GPU's.
    names = ("dw_forward_bfloat16_k5_s2_v2_full", "dw_backward_input_bfloat16_k5_56_s1_v2",
             "dw_weight_partials_bfloat16_k5_t1024_w4", "dw_weight_reduce_bfloat16_k5",
             "dw_forward_bfloat16_k5_s2_u2_stats")
    cases = {c.name: c for c in K.aot_cases()}
    for name in names:
        r = _aot.compile_case(cases[name], 90)
        assert r.registers > 0 and r.spill_bytes == 0 and r.stack_bytes == 0, name


def test_fused_layer_backward_composes_like_the_op():
    # slimops.ops.depthwise_conv2d's autograd: grad_z = epilogue_backward(grad_out, out,
    # scale, act), then the two backward kernels on grad_z. Checked end to end against autograd
    # of the reference layer (prefix weight, scale/shift, relu6).
    from slimops.kernels.epilogue import epilogue_backward

    x, weight, s, p, d = _make(GEOMETRIES[1], (5, 13))
    scale = torch.rand(5, device=DEVICE) + 0.5
    shift = torch.randn(5, device=DEVICE)
    xr = x.clone().requires_grad_()
    wr = weight.clone().requires_grad_()
    expected = reference.depthwise_conv2d(xr, wr, None, s, p, d, scale, shift, None, "relu6")
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    out = K.depthwise_conv2d(x, weight, None, s, p, d, scale, shift, None, 2)
    grad_z = epilogue_backward(grad_out, out, scale, 2)
    torch.testing.assert_close(
        K.depthwise_conv2d_backward_input(grad_z, weight, list(x.shape), s, p, d), xr.grad,
        **TOL[torch.float32])
    torch.testing.assert_close(K.depthwise_conv2d_backward_weight(grad_z, x, weight, s, p, d),
                               wr.grad, **TOL[torch.float32])


# ----------------------------------------------------------------- forward with statistics

# (kernel, stride, padding, dilation, H, W): as GEOMETRIES, plus a 13x11 plane whose 143
# output pixels span two pixel blocks per image (several partial rows per image).
STATS_GEOMETRIES = [
    (3, 1, 1, 1, 13, 11),
    (3, 2, 1, 1, 9, 7),
    (3, 2, 2, 2, 7, 9),
    (5, 1, 2, 1, 7, 7),
    (5, 2, 0, 1, 9, 8),
    (5, 1, 1, 2, 9, 9),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("geo", STATS_GEOMETRIES, ids=_geo_id)
def test_forward_with_stats_matches_reference(geo, dtype):
    x, weight, s, p, d = _make(geo, (5, 13), dtype)
    bias = torch.randn(13, device=DEVICE).to(dtype)
    z, moments = K.depthwise_conv2d_with_stats(x, weight, bias, s, p, d)
    expected = reference.depthwise_conv2d(x.float(), weight.float(), bias.float(), s, p, d)
    assert z.dtype == dtype and z.is_contiguous() and z.shape == expected.shape
    torch.testing.assert_close(z.float(), expected.to(dtype).float(), **TOL[dtype])
    # one row of moments per (image, tile), fp32: those of the stored z
    _check_moments(z, moments, K._forward_tiling(x, z.shape[2], z.shape[3], geo[0] ** 2))
    # the same inputs give bit-identical outputs and moments
    z2, moments2 = K.depthwise_conv2d_with_stats(x, weight, bias, s, p, d)
    assert torch.equal(z, z2) and torch.equal(moments, moments2)


def _check_moments(z, moments, t):
    """``moments`` [3, N * tiles, C] (``t``: the forward's tiling): row
    ``n * tiles + strip * row_tiles + r`` holds the count, mean and M2 of ``z[n, c]`` over
    output rows ``[r * ROWS, (r + 1) * ROWS)`` and columns ``[strip * G * V, ...)`` (clipped
    to the plane)."""
    n, c, ho, wo = z.shape
    rows_per, cols_per = t["ROWS"], t["G"] * t["V"]
    assert moments.dtype == torch.float32
    assert moments.shape == (3, n * t["strips"] * t["row_tiles"], c)
    zf = z.float()
    tiles = [zf[i, :, r * rows_per:(r + 1) * rows_per, k * cols_per:(k + 1) * cols_per]
             .reshape(c, -1) for i in range(n) for k in range(t["strips"])
             for r in range(t["row_tiles"])]
    count = torch.tensor([[float(v.shape[1])] * c for v in tiles])
    mean = torch.stack([v.mean(1) for v in tiles])
    m2 = torch.stack([((v - v.mean(1, keepdim=True)) ** 2).sum(1) for v in tiles])
    assert torch.equal(moments[0].cpu(), count)
    torch.testing.assert_close(moments[1], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments[2], m2, rtol=1e-4, atol=1e-4)


def test_forward_with_stats_without_bias_leaves_plain_forward_unchanged(small_tiles):
    x, weight, s, p, d = _make(STATS_GEOMETRIES[0], (7, 7))
    z, moments = K.depthwise_conv2d_with_stats(x, weight, None, s, p, d)
    plain = K.depthwise_conv2d(x, weight, None, s, p, d, None, None, None, 0)
    assert torch.equal(z, plain)
    # 13 output rows in tiles of 2 rows: 7 moment rows per image, all from one program
    t = K._forward_tiling(x, 13, 11)
    assert (t["ROWS"], t["row_tiles"], t["tiles_per_prog"]) == (2, 7, 7)
    assert moments.shape == (3, 2 * 7, 7)
    _check_moments(z, moments, t)


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("geo", [STATS_GEOMETRIES[0], STATS_GEOMETRIES[4]], ids=_geo_id)
def test_stats_epilogue_then_bn_equals_reference(geo, activation):
    from slimops.kernels import batch_norm_act as bn_kernels

    x, weight, s, p, d = _make(geo, (5, 13))
    c = 5
    bias = torch.randn(13, device=DEVICE)
    gamma, beta = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    z, moments = K.depthwise_conv2d_with_stats(x, weight, bias, s, p, d)
    residual = torch.randn_like(z) if activation != "relu6" else None
    out, mean, var = bn_kernels.batch_norm_act_from_partials(
        z, moments, z.numel() // c, gamma, beta, 1e-5, residual,
        {None: 0, "relu": 1, "relu6": 2}[activation])
    z_ref = reference.depthwise_conv2d(x, weight, bias, s, p, d)
    out_ref = reference.batch_norm_act(z_ref, gamma, beta, None, None, True, eps=1e-5,
                                       residual=residual, activation=activation)
    torch.testing.assert_close(z, z_ref, **TOL[torch.float32])
    torch.testing.assert_close(mean, z_ref.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, z_ref.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(out, out_ref, **TOL[torch.float32])


# ------------------------------------------------------------ the forward's tiling

@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of at most 16 lanes and one program per (plane, strip): small test planes then
    span several row tiles, looped over by one program, and several column strips."""
    monkeypatch.setattr(K, "MAX_TILE_LANES", 16)
    monkeypatch.setattr(K, "TARGET_PROGRAMS", 1)


# (kernel, stride, padding, dilation, H, W): W a multiple of 8 (aligned: vector loads for
# fp32 and fp16), of 4 (fp16 in 8-byte chunks), of 2 only (2-element chunks) or odd; W
# smaller than one lane's outputs; stride 2 with an aligned input and an output width that is
# not a multiple of the input's vector; dilation; 5x5 and 7x7.
TILING_GEOMETRIES = [
    (3, 1, 1, 1, 10, 16),
    (3, 1, 1, 1, 7, 14),
    (3, 2, 1, 1, 7, 12),
    (3, 1, 1, 1, 9, 13),
    (3, 1, 1, 1, 5, 3),
    (3, 2, 1, 1, 11, 24),
    (3, 2, 0, 1, 8, 8),
    (3, 1, 2, 2, 9, 16),
    (5, 1, 2, 1, 8, 16),
    (5, 2, 2, 1, 9, 24),
    (7, 1, 3, 1, 9, 16),
]


@pytest.mark.parametrize("dtype,tiling", [(torch.float32, "default"), (torch.float32, "small"),
                                          (torch.float16, "default")], ids=str)
@pytest.mark.parametrize("geo", TILING_GEOMETRIES, ids=_geo_id)
def test_forward_tiling_matches_reference(geo, dtype, tiling, request):
    # One image, channels 5 of a 13-channel weight (the full width runs in the tests above).
    if tiling == "small":
        request.getfixturevalue("small_tiles")
    x, weight, s, p, d = _make(geo, (5, 13), dtype, n=1)
    c, c_full = 5, 13
    bias = torch.randn(c_full, device=DEVICE).to(dtype)
    scale = (torch.rand(c, device=DEVICE) + 0.5).to(dtype)
    shift = torch.randn(c, device=DEVICE).to(dtype)
    z32 = reference.depthwise_conv2d(x.float(), weight.float(), None, s, p, d)
    residual = torch.randn_like(z32).to(dtype)
    expected = reference.depthwise_conv2d(x.float(), weight.float(), bias.float(), s, p, d,
                                          scale.float(), shift.float(), residual.float(), "relu6")
    out = K.depthwise_conv2d(x, weight, bias, s, p, d, scale, shift, residual, 2)
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), **TOL[dtype])
    plain = K.depthwise_conv2d(x, weight, None, s, p, d, None, None, None, 0)
    torch.testing.assert_close(plain.float(), z32.to(dtype).float(), **TOL[dtype])
    z, moments = K.depthwise_conv2d_with_stats(x, weight, None, s, p, d)
    assert torch.equal(z, plain)
    _check_moments(z, moments, K._forward_tiling(x, z.shape[2], z.shape[3], geo[0] ** 2))


def test_small_tiles_loop_over_row_tiles_and_strips(small_tiles):
    # 72 columns of fp32 in lanes of 4 outputs, at most 16 lanes per strip: two strips; 9 rows
    # in tiles of 1 row: one program loops over 9 tiles.
    x = torch.randn(2, 5, 9, 72, device=DEVICE)
    t = K._forward_tiling(x, 9, 72)
    assert (t["V"], t["ALIGNED"], t["G"], t["strips"]) == (4, True, 16, 2)
    assert t["tiles_per_prog"] == t["row_tiles"] > 1 and t["row_groups"] == 1
    weight = torch.randn(13, 1, 3, 3, device=DEVICE)
    bias = torch.randn(13, device=DEVICE)
    out = K.depthwise_conv2d(x, weight, bias, [1, 1], [1, 1], [1, 1], None, None, None, 1)
    expected = reference.depthwise_conv2d(x, weight, bias, 1, 1, 1, activation="relu")
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_forward_asymmetric_geometry():
    # H and W take different strides, paddings and dilations (H's are run-time arguments,
    # W's compile-time ones).
    x = torch.randn(2, 5, 11, 16, device=DEVICE)
    weight = torch.randn(13, 1, 3, 5, device=DEVICE)
    for s, p, d in [((2, 1), (1, 2), (1, 1)), ((1, 2), (0, 4), (2, 2))]:
        out = K.depthwise_conv2d(x, weight, None, list(s), list(p), list(d), None, None, None,
                                 0)
        expected = reference.depthwise_conv2d(x, weight, None, s, p, d)
        torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_forward_tiling_choices():
    """The vector width follows the dtype and the rows' alignment; misaligned strides fall
    back to per-element loads (still correct)."""
    half = torch.empty(1, 4, 56, 56, dtype=torch.float16, device=DEVICE)
    t = K._forward_tiling(half, 56, 56)
    assert (t["V"], t["ALIGNED"], t["OUT_V"]) == (8, True, 8)
    t = K._forward_tiling(half, 28, 28)  # stride 2: 16-byte input chunks, 8-byte stores
    assert (t["V"], t["ALIGNED"], t["OUT_V"]) == (8, True, 4)
    t = K._forward_tiling(half.float(), 56, 56)
    assert (t["V"], t["ALIGNED"], t["OUT_V"]) == (4, True, 4)
    t = K._forward_tiling(half, 56, 56, 25)  # 5x5: at most MAX_V_LARGE_KERNEL outputs
    assert (t["V"], t["ALIGNED"], t["OUT_V"]) == (K.MAX_V_LARGE_KERNEL, True,
                                                  K.MAX_V_LARGE_KERNEL)
    t = K._forward_tiling(torch.empty(1, 4, 7, 7, device=DEVICE), 7, 7)
    assert (t["V"], t["ALIGNED"], t["OUT_V"]) == (K.MAX_UNALIGNED_V, False, 1)
    t = K._forward_tiling(torch.empty(1, 4, 7, 7, device=DEVICE), 7, 7, 25)  # 5x5 unaligned
    assert (t["V"], t["ALIGNED"], t["OUT_V"]) == (K.MAX_V_LARGE_KERNEL, False, 1)
    # channels-last strides: the W stride is not 1
    cl = torch.empty(1, 4, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    assert not K._forward_tiling(cl, 8, 8)["ALIGNED"]
    weight = torch.randn(4, 1, 3, 3, device=DEVICE)
    cl.copy_(torch.randn(1, 4, 8, 8))
    torch.testing.assert_close(
        K.depthwise_conv2d(cl, weight, None, [1, 1], [1, 1], [1, 1], None, None, None, 0),
        reference.depthwise_conv2d(cl, weight, None, 1, 1, 1), **TOL[torch.float32])


def test_past_32_bit_offsets_raises_before_launch():
    """Issue 14, item 2: the weight-gradient kernel walks the batch's output pixels with one
    32-bit index; past 2^31 it raises instead of wrapping. Zero-stride views: no memory."""
    weight = torch.randn(4, 1, 3, 3, device=DEVICE)
    x = torch.empty(1, 1, 1, 1, device=DEVICE).expand(2 ** 16, 4, 2 ** 8, 2 ** 8)
    with pytest.raises(ValueError, match="output_pixels .* 32-bit offsets"):
        K.depthwise_conv2d_backward_weight(x, x, weight, [1, 1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="32 bits"):  # a stride past the in-plane offsets
        K.depthwise_conv2d(torch.randn(1, 4, 5, 5, device=DEVICE), weight, None, [1, 2 ** 31],
                           [1, 1], [1, 1], None, None, None, 0)


# ------------------------------------------------------------------ input gradient (issue 17)
# The input gradient is row-tiled like the forward: each lane computes stride_w * V
# consecutive gradient columns, which (column, tap) pairs meet fixed at compile time by the
# W-direction geometry, so every geometry below is a binary of its own. Checked against
# torch's conv2d backward in float64, on a channel prefix of a wider shared weight.


def _torch_grad_input(grad_z, weight, x_shape, s, p, d):
    """The reference input gradient: autograd of F.conv2d on ``weight[:C]``, float64."""
    x = torch.zeros(x_shape, dtype=torch.float64, device=grad_z.device, requires_grad=True)
    z = reference.depthwise_conv2d(x, weight.double(), None, s, p, d)
    (g,) = torch.autograd.grad(z, x, grad_z.double())
    return g


def _backward_input_geometries(k, s, d):
    """(padding, H, W) for a (k, stride, dilation): paddings 0-3 (past k - 1: the stride-1
    transposed padding (k - 1) * d - p goes negative) on 1, 2, 7 and 13 wide/high planes, the
    ones with a non-empty output."""
    kh, kw = k
    out = []
    for p in (0, 1, 2, 3):
        for h, w in [(1, 1), (2, 7), (7, 13), (13, 2), (7, 1)]:
            if h + 2 * p > d * (kh - 1) and w + 2 * p > d * (kw - 1):
                out.append((p, h, w))
    return out


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("k", [(3, 3), (5, 5), (1, 3)], ids=lambda k: f"{k[0]}x{k[1]}")
def test_backward_input_matches_torch_over_geometries(k, s, d):
    c, c_full = 3, 7
    weight = torch.randn(c_full, 1, *k, device=DEVICE)
    cases = _backward_input_geometries(k, s, d)
    assert any(p > k[1] - 1 for p, _, _ in cases) or k[1] * d > 4
    for p, h, w in cases:
        ho = (h + 2 * p - d * (k[0] - 1) - 1) // s + 1
        wo = (w + 2 * p - d * (k[1] - 1) - 1) // s + 1
        grad_z = torch.randn(2, c, ho, wo, device=DEVICE)
        got = K.depthwise_conv2d_backward_input(grad_z, weight, [2, c, h, w], [s, s], [p, p],
                                                [d, d])
        want = _torch_grad_input(grad_z, weight, (2, c, h, w), s, p, d)
        assert got.shape == (2, c, h, w) and got.dtype == grad_z.dtype
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"p={p} {h}x{w}: {m}")


# (kernel h, w, stride, padding, dilation, H, W): H and W with different geometries (H's
# are run-time arguments, W's compile-time), aligned rows (W a multiple of 8 or 16), strides
# 2 and 3 with both vector widths, several row tiles and column strips (with small_tiles).
BACKWARD_INPUT_TILING = [
    ((3, 3), (1, 1), (1, 1), (1, 1), 10, 32),
    ((3, 3), (1, 1), (1, 1), (1, 1), 3, 160),  # several strips with small tiles
    ((3, 3), (2, 2), (1, 1), (1, 1), 17, 32),
    ((3, 3), (2, 2), (1, 1), (1, 1), 5, 160),
    ((3, 3), (2, 2), (0, 0), (1, 1), 17, 33),
    ((3, 3), (3, 3), (1, 1), (1, 1), 19, 48),
    ((5, 5), (2, 2), (2, 2), (1, 1), 9, 32),
    ((3, 5), (2, 1), (1, 2), (1, 1), 11, 16),
    ((3, 3), (1, 2), (0, 4), (2, 2), 11, 17),
    ((3, 3), (1, 1), (3, 3), (1, 1), 17, 16),  # transposed padding -1
]


@pytest.mark.parametrize("tiling", ["default", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geo", BACKWARD_INPUT_TILING, ids=str)
def test_backward_input_tilings_and_dtypes(geo, dtype, tiling, request):
    if tiling == "small":
        request.getfixturevalue("small_tiles")
    k, s, p, d, h, w = geo
    c, c_full = 5, 13
    weight = torch.randn(c_full, 1, *k, device=DEVICE).to(dtype)
    ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    grad_z = torch.randn(1, c, ho, wo, device=DEVICE).to(dtype)
    got = K.depthwise_conv2d_backward_input(grad_z, weight, [1, c, h, w], list(s), list(p),
                                            list(d))
    want = _torch_grad_input(grad_z, weight, (1, c, h, w), s, p, d)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.to(dtype).float(), **TOL[dtype])
    if tiling == "small":  # the small tiles really loop over row tiles or split in strips
        t = K._backward_input_tiling(grad_z, h, w, s[1], k[0] * k[1])
        assert t["tiles_per_prog"] > 1 or t["strips"] > 1


def test_backward_input_tiling_choices():
    """A lane's columns: ``stride_w * V`` with ``V`` the forward's choice for grad_z's rows,
    at most 16 accumulators; stores in chunks dividing both the lane's columns and W."""
    half = torch.empty(1, 4, 56, 56, dtype=torch.float16, device=DEVICE)
    t = K._backward_input_tiling(half, 56, 56, 1, 9)
    assert (t["V"], t["ALIGNED"], t["OUT_V"]) == (8, True, 8)
    t = K._backward_input_tiling(half, 112, 112, 2, 9)  # 16 columns per lane
    assert (t["V"], t["ALIGNED"], t["OUT_V"]) == (8, True, 8)
    assert t["strips"] * t["G"] * t["V"] * 2 >= 112
    t = K._backward_input_tiling(half[..., :28, :28], 56, 56, 2, 9)  # rows of 28: V = 4
    assert (t["V"], t["ALIGNED"]) == (4, True)
    t = K._backward_input_tiling(half, 168, 168, 3, 9)  # 16 // 3: V = 4, 12 columns
    assert (t["V"], t["OUT_V"]) == (4, 4)
    t = K._backward_input_tiling(half.float(), 57, 57, 1, 9)  # odd W: scalar stores
    assert (t["V"], t["OUT_V"]) == (4, 1)
    t = K._backward_input_tiling(torch.empty(1, 4, 7, 7, device=DEVICE), 14, 14, 2, 9)
    assert (t["V"], t["ALIGNED"], t["OUT_V"]) == (K.MAX_UNALIGNED_V, False, 2)


def test_backward_input_reads_strided_grad_z_and_weight_in_place():
    # channels-last grad_z (W stride not 1: per-element loads) and a weight whose taps are
    # not contiguous (a transposed view of the full weight)
    c = 4
    weight = torch.randn(6, 1, 3, 3, device=DEVICE).transpose(2, 3)
    for s in (1, 2):
        ho = (9 + 2 - 3) // s + 1
        gz = torch.randn(2, c, ho, ho, device=DEVICE).to(memory_format=torch.channels_last)
        got = K.depthwise_conv2d_backward_input(gz, weight, [2, c, 9, 9], [s, s], [1, 1],
                                                [1, 1])
        torch.testing.assert_close(got.double(),
                                   _torch_grad_input(gz, weight, (2, c, 9, 9), s, 1, 1),
                                   rtol=1e-5, atol=1e-5)


class _ConvWithKernelGradInput(torch.autograd.Function):
    """F.conv2d forward (float64) whose input gradient is the Triton kernel's."""

    @staticmethod
    def forward(ctx, x, weight, s, p, d):
        ctx.save_for_backward(weight)
        ctx.geo = (list(x.shape), s, p, d)
        return reference.depthwise_conv2d(x, weight, None, s, p, d)

    @staticmethod
    def backward(ctx, grad_z):
        (weight,) = ctx.saved_tensors
        shape, s, p, d = ctx.geo
        gx = K.depthwise_conv2d_backward_input(grad_z.contiguous(), weight, shape, s, p, d)
        return gx, None, None, None, None


@pytest.mark.parametrize("geo", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 3, 1), (3, 3, 2, 2),
                                 (5, 2, 3, 1)], ids=lambda g: "k{}s{}p{}d{}".format(*g))
def test_backward_input_gradcheck(geo):
    """torch.autograd.gradcheck in float64: the numerical Jacobian of the convolution against
    the kernel's vector-Jacobian products (accumulated in fp32: gradcheck's default
    tolerances hold)."""
    k, s, p, d = geo
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 1, k, k, dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda t: _ConvWithKernelGradInput.apply(t, weight, [s, s], [p, p], [d, d]), (x,))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
@pytest.mark.parametrize("geo", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 2, 0, 2), (5, 1, 3, 1)],
                         ids=lambda g: "k{}s{}p{}d{}".format(*g))
def test_backward_input_propagates_nan_and_inf_like_torch(geo):
    """NaN, +Inf and -Inf in grad_z reach exactly the input pixels torch's backward gives
    them (the gather masks every tap that does not read a real grad_z element, so no
    0 * Inf or NaN appears where torch has none; +Inf and -Inf meeting give NaN)."""
    k, s, p, d = geo
    c, h, w = 3, 9, 16
    weight = torch.randn(5, 1, k, k, device=DEVICE)
    weight[1, 0, 0, 0] = 0.0  # 0 * Inf = NaN where this tap reads an Inf
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (w + 2 * p - d * (k - 1) - 1) // s + 1
    grad_z = torch.randn(1, c, ho, wo, device=DEVICE)
    grad_z[0, 0, 1, 2] = float("nan")
    grad_z[0, 1, 0, 0] = float("inf")
    grad_z[0, 1, ho - 1, wo - 1] = float("-inf")
    grad_z[0, 2, 1, 1] = float("inf")
    grad_z[0, 2, 1, 2] = float("-inf")
    got = K.depthwise_conv2d_backward_input(grad_z, weight, [1, c, h, w], [s, s], [p, p],
                                            [d, d])
    want = _torch_grad_input(grad_z, weight, (1, c, h, w), s, p, d).float()
    assert torch.isnan(want).any() and torch.isinf(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isposinf(got), torch.isposinf(want))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    torch.testing.assert_close(got, want, equal_nan=True, **TOL[torch.float32])
