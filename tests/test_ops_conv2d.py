"""slimops.ops.conv2d (the compiled kernel behind it) against slimops.reference.conv2d:
forward and backward over geometry, per-group prefixes, the fused epilogue, batch sizes and
memory layouts; float64 gradcheck; torch.library.opcheck of the op and its backward ops;
torch.compile (aot_eager, fullgraph) against eager."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

import slimops
from slimops import reference

from helpers import OPCHECK_UTILS, compare_with_reference, leaf

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
    ),
]

F32, F64 = torch.float32, torch.float64
DTYPES = [pytest.param(F32, id="f32"), pytest.param(F64, id="f64")]
ACTS = [pytest.param(None, id="none"), pytest.param("relu", id="relu"),
        pytest.param("relu6", id="relu6")]

# groups -> (full weight shape [G*Og, Ig] without the kernel, active (out, in) prefixes).
# Prefixes: full size, og = ig = 1, and mixed ones.
WEIGHTS = {
    1: ((13, 7), [(13, 7), (1, 1), (7, 3), (3, 7)]),
    3: ((15, 3), [(15, 9), (3, 3), (6, 9), (15, 3)]),
}
# (H, W, N): odd spatial sizes, with batches below and above the thread count (2) so both
# the image-serial and the image-parallel paths of the kernel run.
SIZES = [(1, 1, 3), (3, 7, 1), (7, 3, 2), (13, 13, 1)]

# The epilogue is act((z + b) * scale + shift + residual) on the active channels.
EPILOGUE_FLAGS = list(itertools.product([False, True], repeat=4))  # bias, scale, shift, residual


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def out_hw(h, w, k, s, p, d):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, _pair(s), _pair(p), _pair(d)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def run_and_compare(kwargs, tol, *, check_weight_zeros=True, grad_out=None):
    """slimops.ops.conv2d vs the reference, forward and backward (helpers.compare_with_reference),
    and the weight gradient exactly zero outside the active per-group prefixes."""
    out, ref, names, grads = compare_with_reference(slimops.ops.conv2d, reference.conv2d,
                                                    kwargs, tol, grad_out)
    if check_weight_zeros and "weight" in names:
        gw = grads[names.index("weight")]
        w = kwargs["weight"]
        groups = kwargs.get("groups", 1)
        og = kwargs["out_channels"] // groups
        ig = kwargs["input"].shape[1] // groups
        used = torch.zeros(groups, w.shape[0] // groups, w.shape[1], dtype=torch.bool)
        used[:, :og, :ig] = True
        outside = gw.view(groups, w.shape[0] // groups, w.shape[1], -1)[~used]
        assert torch.equal(outside, torch.zeros_like(outside)), "grad outside the prefix"
    return out, ref


# --------------------------------------------------------------------------------------
# forward + backward over the geometry, every prefix, odd sizes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dilation", [1, 2], ids=["d1", "d2"])
@pytest.mark.parametrize("padding", [0, 1, (2, 1)], ids=["p0", "p1", "p21"])
@pytest.mark.parametrize("stride", [1, 2, (2, 1)], ids=["s1", "s2", "s21"])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3), (5, 3)], ids=["k1", "k3", "k53"])
@pytest.mark.parametrize("groups", [1, 3], ids=["g1", "g3"])
def test_geometry_prefixes(groups, kernel, stride, padding, dilation, dtype, tol):
    (rows, ig_full), prefixes = WEIGHTS[groups]
    weight = torch.randn(rows, ig_full, *kernel, dtype=dtype)
    bias = torch.randn(rows, dtype=dtype)
    ran = 0
    for (o, i), (h, w, n) in itertools.product(prefixes, SIZES):
        ho, wo = out_hw(h, w, kernel, stride, padding, dilation)
        if ho < 1 or wo < 1:
            continue
        kwargs = dict(
            input=torch.randn(n, i, h, w, dtype=dtype, requires_grad=True),
            weight=leaf(weight), bias=leaf(bias), out_channels=o, stride=stride,
            padding=padding, dilation=dilation, groups=groups,
        )
        out, _ = run_and_compare(kwargs, tol)
        assert out.shape == (n, o, ho, wo)
        ran += 1
    assert ran >= 4  # the sweep is not vacuous


@pytest.mark.parametrize("n", [1, 3], ids=["N1", "N3"])
@pytest.mark.parametrize("groups", [1, 3], ids=["g1", "g3"])
def test_threaded(groups, n, all_threads, tol):
    """Threaded (image, column block) tasks: N < threads (each image split into blocks of
    output positions) and N >= threads, with im2col and the pointwise (1x1) path. The plane
    is large enough for the full prefixes to pass the 128K multiply-adds under which a pass
    runs on one thread (csrc/cpu/parallel.h); the 1-channel prefixes stay under it."""
    assert torch.get_num_threads() >= 2
    (rows, ig_full), prefixes = WEIGHTS[groups]
    for kernel, stride, padding in [((3, 3), 1, 1), ((1, 1), 1, 0), ((5, 3), (2, 1), (2, 1))]:
        weight = torch.randn(rows, ig_full, *kernel, dtype=F64)
        for o, i in prefixes[:3]:
            kwargs = dict(input=leaf(torch.randn(n, i, 53, 47, dtype=F64)), weight=leaf(weight),
                          bias=leaf(torch.randn(rows, dtype=F64)), out_channels=o,
                          stride=stride, padding=padding, groups=groups)
            run_and_compare(kwargs, tol)


def test_tiny_gemm_restores_mkl_thread_count(all_threads, tol):
    """csrc/cpu/gemm.h runs a product under 128K multiply-adds on the calling thread by
    setting MKL's per-thread count to 1 (MKL opened its team even for an 8x4x8 product), and
    sets it back: after the op, this thread's setting is what it was (torch.set_num_threads
    sets it too)."""
    import ctypes

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    set_local = getattr(lib, "MKL_Set_Num_Threads_Local", None)
    if set_local is None:
        pytest.skip("this torch build does not export MKL's per-thread count")
    kwargs = dict(input=torch.randn(1, 4, 2, 2), weight=torch.randn(8, 8, 1, 1), bias=None,
                  out_channels=8, stride=1, padding=0, dilation=1, groups=1)
    before = set_local(0)  # reads the setting (returns the previous one) ...
    set_local(before)  # ... and puts it back
    out = slimops.ops.conv2d(**kwargs)  # partial input width: the kernels' GEMM path
    torch.testing.assert_close(out, reference.conv2d(**kwargs), **tol(F32, out))
    assert set_local(before) == before


@pytest.mark.parametrize("threads", ["one_thread", "all_threads"])
@pytest.mark.parametrize("geometry", [dict(kernel=(3, 3), stride=1, padding=1),
                                      dict(kernel=(3, 3), stride=2, padding=1),
                                      dict(kernel=(1, 1), stride=1, padding=0)],
                         ids=["k3s1", "k3s2", "k1"])
def test_many_column_blocks(geometry, threads, request, tol):
    """Outputs large enough that each image splits into several blocks of output positions
    (a block's GEMM operands stay within ~1 MiB), block edges falling inside output rows:
    im2col per block, per-block GEMMs into the strided output, the epilogue per block."""
    request.getfixturevalue(threads)
    kernel = geometry["kernel"]
    weight = torch.randn(80, 72, *kernel)
    kwargs = dict(input=leaf(torch.randn(2, 70, 37, 41)), weight=leaf(weight),
                  bias=leaf(torch.randn(80)), out_channels=77, stride=geometry["stride"],
                  padding=geometry["padding"], scale=leaf(torch.randn(77)),
                  shift=leaf(torch.randn(77)), activation="relu")
    ho, wo = out_hw(37, 41, kernel, geometry["stride"], geometry["padding"], 1)
    kwargs["residual"] = leaf(torch.randn(2, 77, ho, wo))
    run_and_compare(kwargs, tol)


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)], ids=["k1", "k3"])
def test_small_output_split_by_channels(kernel, all_threads, tol):
    """One image, a small output (P < 256 per thread): the threads split the output channels
    (blocks of 16 rows and a remainder), each with its own rows of the weight prefix."""
    weight = torch.randn(80, 72, *kernel)
    ho, wo = out_hw(9, 11, kernel, 1, kernel[0] // 2, 1)
    kwargs = dict(input=leaf(torch.randn(1, 70, 9, 11)), weight=leaf(weight),
                  bias=leaf(torch.randn(80)), out_channels=77, padding=kernel[0] // 2,
                  scale=leaf(torch.randn(77)), shift=leaf(torch.randn(77)),
                  residual=leaf(torch.randn(1, 77, ho, wo)), activation="relu6")
    run_and_compare(kwargs, tol)


@pytest.mark.parametrize("threads", ["one_thread", "all_threads"])
@pytest.mark.parametrize("groups", [1, 3], ids=["g1", "g3"])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)], ids=["k1", "k3"])
def test_small_outputs_several_images_per_gemm(kernel, groups, threads, request, tol):
    """Outputs under 256 positions: tasks take several images (5 here: an uneven split) and
    run one GEMM over their positions side by side, then scatter per image with the
    epilogue."""
    request.getfixturevalue(threads)
    weight = torch.randn(24 * groups, 9, *kernel)
    ho, wo = out_hw(7, 9, kernel, 1, kernel[0] // 2, 1)
    kwargs = dict(input=leaf(torch.randn(5, 8 * groups, 7, 9)), weight=leaf(weight),
                  bias=leaf(torch.randn(24 * groups)), out_channels=21 * groups,
                  padding=kernel[0] // 2, groups=groups,
                  scale=leaf(torch.randn(21 * groups)), shift=leaf(torch.randn(21 * groups)),
                  residual=leaf(torch.randn(5, 21 * groups, ho, wo)), activation="relu")
    run_and_compare(kwargs, tol)


@pytest.mark.parametrize("threads", ["one_thread", "all_threads"])
@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)], ids=["k1", "k3"])
@pytest.mark.parametrize("plane", [(1, 1), (1, 3), (2, 2), (2, 3), (3, 5), (9, 9)],
                         ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_tiny_planes_many_images(plane, kernel, threads, request, tol):
    """The small-image paths of all three passes (the demo's 2x2 to 8x8 planes at batch 64):
    images gathered side by side into one GEMM operand, plane rows and gradient rows of every
    copy length (1 to 8 values, and 81, past the short-copy path), an uneven image count that
    the threads split mid-row, partial widths of the weight."""
    request.getfixturevalue(threads)
    h, w = plane
    padding = kernel[0] // 2
    stride = 1 if kernel == (1, 1) else 2
    ho, wo = out_hw(h, w, kernel, stride, padding, 1)
    kwargs = dict(input=leaf(torch.randn(37, 11, h, w)), weight=leaf(torch.randn(24, 16, *kernel)),
                  bias=leaf(torch.randn(24)),
                  out_channels=19, stride=stride, padding=padding,
                  residual=leaf(torch.randn(37, 19, ho, wo)), activation="relu")
    run_and_compare(kwargs, tol)


# --------------------------------------------------------------------------------------
# the fused epilogue, piece by piece


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("flags", EPILOGUE_FLAGS,
                         ids=["".join(n for n, f in zip("bcsr", fl) if f) or "plain"
                              for fl in EPILOGUE_FLAGS])
@pytest.mark.parametrize("groups", [1, 3], ids=["g1", "g3"])
def test_epilogue(groups, flags, activation, dtype, tol):
    with_bias, with_scale, with_shift, with_residual = flags
    if groups == 1:
        weight = torch.randn(13, 7, 3, 3, dtype=dtype)
        o, i, geometry = 7, 5, dict(stride=1, padding=1, dilation=1)
    else:
        weight = torch.randn(15, 3, 3, 3, dtype=dtype)
        o, i, geometry = 9, 6, dict(stride=2, padding=1, dilation=1)
    x = torch.randn(2, i, 7, 7, dtype=dtype)
    ho, wo = out_hw(7, 7, (3, 3), geometry["stride"], 1, 1)
    kwargs = dict(
        input=leaf(x), weight=leaf(weight),
        bias=leaf(torch.randn(weight.shape[0], dtype=dtype)) if with_bias else None,
        out_channels=o, groups=groups, **geometry,
        scale=leaf(torch.randn(o, dtype=dtype) * 2) if with_scale else None,
        shift=leaf(torch.randn(o, dtype=dtype) * 3) if with_shift else None,
        residual=leaf(torch.randn(2, o, ho, wo, dtype=dtype) * 3) if with_residual else None,
        activation=activation,
    )
    out, ref = run_and_compare(kwargs, tol)
    # the data exercises every branch of the activation
    if activation is not None:
        assert (ref == 0).any() and (ref > 0).any()
    if activation == "relu6":
        assert (ref == 6).any() and ((ref > 0) & (ref < 6)).any()


def test_epilogue_changes_the_output():
    """Guard against an epilogue argument being silently ignored."""
    w = torch.randn(8, 4, 3, 3, dtype=F64)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    base = slimops.ops.conv2d(x, w, None, 6, padding=1)
    for kw in (dict(bias=torch.ones(8, dtype=F64)), dict(scale=torch.full((6,), 2.0, dtype=F64)),
               dict(shift=torch.ones(6, dtype=F64)),
               dict(residual=torch.ones(2, 6, 5, 5, dtype=F64))):
        assert not torch.allclose(slimops.ops.conv2d(x, w, out_channels=6, padding=1, **kw), base)
    torch.testing.assert_close(slimops.ops.conv2d(x, w, None, 6, padding=1, activation="relu"),
                               base.clamp_min(0), rtol=0, atol=0)


def test_grouped_bias_follows_weight_rows(tol):
    """groups=3, og=1 of Og=4: output channel g reads bias row g*4, not row g."""
    w = torch.randn(12, 2, 1, 1, dtype=F64)
    b = torch.arange(12, dtype=F64)
    x = torch.zeros(1, 3, 2, 2, dtype=F64)
    out = slimops.ops.conv2d(x, w, b, 3, groups=3)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 4.0, 8.0], dtype=F64))


# --------------------------------------------------------------------------------------
# batch sizes, including the empty batch


@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
@pytest.mark.parametrize("n", [0, 1, 3], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("groups", [1, 3], ids=["g1", "g3"])
def test_batch_sizes(groups, n, epilogue, tol, all_threads):
    dtype = F64
    weight = torch.randn(12, 4, 3, 3, dtype=dtype)
    o, i = (6, 3) if groups == 1 else (6, 6)
    kwargs = dict(input=leaf(torch.randn(n, i, 5, 6, dtype=dtype)), weight=leaf(weight),
                  bias=leaf(torch.randn(12, dtype=dtype)), out_channels=o, stride=(2, 1),
                  padding=1, groups=groups)
    if epilogue:
        kwargs.update(scale=leaf(torch.randn(o, dtype=dtype)),
                      shift=leaf(torch.randn(o, dtype=dtype)),
                      residual=leaf(torch.randn(n, o, 3, 6, dtype=dtype)), activation="relu6")
    out, _ = run_and_compare(kwargs, tol)
    assert out.shape == (n, o, 3, 6)
    if n == 0:
        # backward through an empty batch: zero parameter gradients, at the full shapes
        slimops.ops.conv2d(**kwargs).sum().backward()
        assert torch.equal(kwargs["weight"].grad, torch.zeros_like(weight))
        assert torch.equal(kwargs["bias"].grad, torch.zeros(12, dtype=dtype))
        assert kwargs["input"].grad.shape == (0, i, 5, 6)


# --------------------------------------------------------------------------------------
# memory layouts: channels_last and non-contiguous tensors


def _non_contiguous(t, how):
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if how == "sliced":  # every other column of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "transposed":  # H and W stored swapped
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    raise AssertionError(how)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("groups", [1, 3], ids=["g1", "g3"])
def test_layouts(groups, how, dtype, tol, all_threads):
    weight = torch.randn(12, 4, 3, 3, dtype=dtype)
    o, i = (9, 6) if groups == 3 else (5, 3)
    x = _non_contiguous(torch.randn(3, i, 7, 5, dtype=dtype), how)
    assert not x.is_contiguous()
    residual = _non_contiguous(torch.randn(3, o, 7, 5, dtype=dtype), how)
    vec = lambda n: torch.randn(2 * n, dtype=dtype)[::2]  # strided 1-D parameters
    grad_out = _non_contiguous(torch.randn(3, o, 7, 5, dtype=dtype), how)
    # (a strided `scale` has its own test below)
    kwargs = dict(input=leaf(x), weight=leaf(weight), bias=leaf(vec(12)), out_channels=o,
                  padding=1, groups=groups, scale=leaf(torch.randn(o, dtype=dtype)),
                  shift=leaf(vec(o)), residual=leaf(residual), activation="relu")
    assert not kwargs["input"].is_contiguous() and not kwargs["bias"].is_contiguous()
    run_and_compare(kwargs, tol, grad_out=grad_out)


@pytest.mark.parametrize("needs", ["input", "weight", "bias", "scale", "shift", "residual"])
def test_single_input_requires_grad(needs, tol):
    """Only one argument needs a gradient (frozen layers, first-layer inputs): the backward
    computes just that one, correctly."""
    t = dict(input=torch.randn(2, 6, 5, 5, dtype=F64),
             weight=torch.randn(12, 4, 3, 3, dtype=F64), bias=torch.randn(12, dtype=F64),
             scale=torch.rand(9, dtype=F64) + 0.5,
             shift=torch.randn(9, dtype=F64), residual=torch.randn(2, 9, 5, 5, dtype=F64))
    kwargs = {k: leaf(v, k == needs) for k, v in t.items()}
    run_and_compare(dict(kwargs, out_channels=9, padding=1, groups=3, activation="relu"), tol)


@pytest.mark.parametrize("absent", ["bias", "scale", "shift"])
@pytest.mark.parametrize("needs", ["weight", "scale", "shift", "residual"])
def test_gradients_after_an_absent_optional_argument(needs, absent, tol):
    """The autograd kernel (csrc/autograd/conv2d.cpp) numbers its gradient edges over the
    tensors present only: with an optional argument absent, each later argument still gets
    its own gradient."""
    if needs == absent:
        pytest.skip("an absent argument has no gradient")
    t = dict(input=torch.randn(2, 6, 5, 5, dtype=F64),
             weight=torch.randn(12, 4, 3, 3, dtype=F64), bias=torch.randn(12, dtype=F64),
             scale=torch.rand(9, dtype=F64) + 0.5,
             shift=torch.randn(9, dtype=F64), residual=torch.randn(2, 9, 5, 5, dtype=F64))
    t[absent] = None
    kwargs = {k: (None if v is None else leaf(v, k in (needs, "input"))) for k, v in t.items()}
    run_and_compare(dict(kwargs, out_channels=9, padding=1, groups=3, activation="relu"), tol)


def test_strided_scale_forward(tol):
    weight = torch.randn(12, 4, 3, 3, dtype=F64)
    scale = torch.randn(18, dtype=F64)[::2]
    kwargs = dict(input=torch.randn(2, 6, 5, 5, dtype=F64), weight=weight, bias=None,
                  out_channels=9, padding=1, groups=3, scale=scale, activation="relu6")
    run_and_compare(kwargs, tol)


@pytest.mark.parametrize("groups", [1, 3], ids=["g1", "g3"])
def test_strided_scale(groups, tol):
    weight = torch.randn(12, 4, 3, 3, dtype=F64)
    o, i = (9, 6) if groups == 3 else (5, 3)
    scale = torch.randn(2 * o, dtype=F64)[::2]
    kwargs = dict(input=leaf(torch.randn(2, i, 5, 5, dtype=F64)), weight=leaf(weight),
                  bias=leaf(torch.randn(12, dtype=F64)), out_channels=o, padding=1,
                  groups=groups, scale=leaf(scale))
    run_and_compare(kwargs, tol)


def test_epilogue_backward_strided_scale():
    g = torch.ones(1, 3, 2, 1, dtype=F64)
    out = torch.ones(1, 3, 2, 1, dtype=F64)
    scale = torch.tensor([1.0, 10.0, 2.0, 20.0, 3.0, 30.0], dtype=F64)[::2]
    got = torch.ops.slimops.epilogue_backward(g, out, scale, 0)
    torch.testing.assert_close(got, g * scale.view(1, -1, 1, 1), rtol=0, atol=0)


def test_expanded_grad_out(tol):
    """`out.sum().backward()` hands the backward a zero-stride gradient."""
    w = torch.randn(8, 4, 3, 3, dtype=F64)
    kwargs = dict(input=torch.randn(2, 4, 6, 6, dtype=F64, requires_grad=True), weight=leaf(w),
                  bias=None, out_channels=6, padding=1,
                  scale=leaf(torch.randn(6, dtype=F64)), activation="relu")
    g = torch.ones(1, 1, 1, 1, dtype=F64).expand(2, 6, 6, 6)
    run_and_compare(kwargs, tol, grad_out=g)


def test_channels_last_weight_falls_back_to_reference(tol, monkeypatch):
    """A non-contiguous shared weight is not a strided-prefix matrix: the op runs on the
    reference path (warning once) and still gives the reference's answer."""
    from slimops.ops import _backend

    monkeypatch.setattr(_backend, "_warned_layout", False)
    w = torch.randn(8, 4, 3, 3, dtype=F64).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    with pytest.warns(RuntimeWarning, match="not contiguous"):
        out = slimops.ops.conv2d(x, w, None, 5, padding=1)
    torch.testing.assert_close(out, reference.conv2d(x, w, None, 5, 1, 1, 1, 1), **tol(F64))


# --------------------------------------------------------------------------------------
# gradcheck (float64)


def _away_from_kinks(pre):
    """A residual that moves the pre-activation `pre` to values at least 0.5 away from the
    kinks of relu (0) and relu6 (0, 6), so finite differences are valid."""
    target = torch.where(pre.abs() < 0.5, pre.sign() * 0.5 + (pre == 0) * 0.5, pre)
    target = torch.where((target - 6).abs() < 0.5, 6 + (target - 6).sign() * 0.5, target)
    return target - pre


GRADCHECK_CASES = {
    # name: (groups, weight shape, out, in, x hw, kernel geometry, activation, fast_mode)
    "g3_prefix_affine": (3, (9, 2, 3, 3), 6, 3, (5, 4), dict(stride=2, padding=1), None, False),
    "g1_prefix_relu": (1, (5, 4, 3, 2), 3, 2, (5, 5), dict(padding=(1, 0), dilation=2), "relu",
                       False),
    "g1_k53_relu6": (1, (6, 5, 5, 3), 4, 3, (7, 6), dict(stride=(2, 1), padding=(2, 1),
                                                         dilation=(1, 2)), "relu6", True),
    "g3_k1_full": (3, (6, 2, 1, 1), 6, 6, (3, 5), dict(), "relu", True),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(case):
    groups, wshape, o, i, (h, w), geometry, act, fast = GRADCHECK_CASES[case]
    x = torch.randn(2, i, h, w, dtype=F64, requires_grad=True)
    weight = torch.randn(*wshape, dtype=F64, requires_grad=True)
    bias = torch.randn(wshape[0], dtype=F64, requires_grad=True)
    scale = (torch.rand(o, dtype=F64) + 0.5).requires_grad_()
    shift = torch.randn(o, dtype=F64, requires_grad=True)
    with torch.no_grad():
        pre = reference.conv2d(x, weight, bias, o, groups=groups, scale=scale, shift=shift,
                               **geometry)
        residual = torch.randn_like(pre) * 2
        residual += _away_from_kinks(pre + residual)
    residual.requires_grad_()

    def fn(x, weight, bias, scale, shift, residual):
        return slimops.ops.conv2d(x, weight, bias, o, groups=groups, scale=scale, shift=shift,
                                  residual=residual, activation=act, **geometry)

    args = (x, weight, bias, scale, shift, residual)
    assert torch.autograd.gradcheck(fn, args, fast_mode=fast)


# --------------------------------------------------------------------------------------
# torch.library.opcheck


def _conv_sample(groups, grad, *, scale=False, act=0, dtype=F64):
    w = torch.randn(12, 3, 3, 3, dtype=dtype)
    o, i = (6, 6) if groups == 3 else (5, 2)
    x = torch.randn(2, i, 6, 5, dtype=dtype)
    ho, wo = out_hw(6, 5, (3, 3), (2, 1), 1, 1)
    return (leaf(x, grad), leaf(w, grad), leaf(torch.randn(12, dtype=dtype), grad), o, [2, 1],
            [1, 1], [1, 1], groups,
            leaf(torch.rand(o, dtype=dtype) + 0.5, grad) if scale else None,
            leaf(torch.randn(o, dtype=dtype), grad),
            leaf(torch.randn(2, o, ho, wo, dtype=dtype), grad), act)


OPCHECK_SAMPLES = {
    "no_grad_g1": lambda: _conv_sample(1, False, scale=True, act=2),
    "no_grad_g3_f32": lambda: _conv_sample(3, False, act=1, dtype=F32),
    "grad_g3_shift_residual": lambda: _conv_sample(3, True),
    "grad_g1_shift_residual": lambda: _conv_sample(1, True),
    "grad_g1_scale_relu": lambda: _conv_sample(1, True, scale=True, act=1),
    "grad_g3_relu6": lambda: _conv_sample(3, True, act=2),
}


@pytest.mark.parametrize("make", list(OPCHECK_SAMPLES.values()), ids=list(OPCHECK_SAMPLES))
def test_opcheck_conv2d(make):
    torch.library.opcheck(torch.ops.slimops.conv2d.default, make(), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("groups", [1, 3], ids=["g1", "g3"])
def test_opcheck_backward_ops(groups):
    w = torch.randn(12, 3, 3, 3, dtype=F64)
    o, i = (6, 6) if groups == 3 else (5, 2)
    x = torch.randn(2, i, 6, 5, dtype=F64)
    gz = torch.randn(2, o, 3, 5, dtype=F64)
    geometry = ([2, 1], [1, 1], [1, 1], groups)
    torch.library.opcheck(torch.ops.slimops.conv2d_backward_input.default,
                          (gz, w, [2, i, 6, 5], *geometry), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.slimops.conv2d_backward_weight.default,
                          (gz, x, w, *geometry), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.slimops.conv2d_backward.default,
                          (gz, x, w, *geometry), test_utils=OPCHECK_UTILS)


def test_opcheck_epilogue_backward():
    out = torch.randn(2, 5, 3, 4, dtype=F64).relu()
    torch.library.opcheck(torch.ops.slimops.epilogue_backward.default,
                          (torch.randn_like(out), out, torch.randn(5, dtype=F64), 1),
                          test_utils=OPCHECK_UTILS)


# (full weight rows x Ig, active out x in, groups, stride, dilation): partial and full widths
BOTH_GRADS_CASES = {
    "partial": ((16, 12), (10, 7), 1, 1, 1),
    "full_input_width": ((16, 12), (9, 12), 1, 2, 1),
    "full": ((16, 12), (16, 12), 1, 1, 2),
    "groups": ((12, 4), (9, 6), 3, 1, 1),
}


@pytest.mark.parametrize("route", ["fixed", "onednn", "auto"])
@pytest.mark.parametrize("case", list(BOTH_GRADS_CASES.values()), ids=list(BOTH_GRADS_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_gradients_op_matches_the_two_backward_ops(case, route, dtype, tol, monkeypatch):
    """slimops::conv2d_backward (the pair as one op, routed as a pair on CPU) gives what the
    two backward ops give and what the reference's autograd gives, on every route."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", route)
    (rows, ig_full), (o, i), groups, stride, dilation = case
    w = torch.randn(rows, ig_full, 3, 3, dtype=dtype)
    # 2 x 9 x 9 x ... above the route's measuring threshold for the auto route's full case
    x = torch.randn(3, i, 23, 21, dtype=dtype)
    xr, wr = leaf(x), leaf(w)
    z = reference.conv2d(xr, wr, None, o, stride, 1, dilation, groups)
    gz = torch.randn_like(z)
    gx_ref, gw_ref = torch.autograd.grad(z, (xr, wr), gz)
    geometry = ([stride] * 2, [1, 1], [dilation] * 2, groups)
    for _ in range(2):  # the auto route's measuring call, then its chosen route
        gx, gw = torch.ops.slimops.conv2d_backward(gz, x, w, *geometry)
        torch.testing.assert_close(gx, gx_ref, **tol(dtype, gx_ref))
        torch.testing.assert_close(gw, gw_ref, **tol(dtype, gw_ref))
    assert gw.shape == w.shape and gw.is_contiguous()
    torch.testing.assert_close(
        gx, torch.ops.slimops.conv2d_backward_input(gz, w, list(x.shape), *geometry),
        **tol(dtype, gx_ref))
    torch.testing.assert_close(
        gw, torch.ops.slimops.conv2d_backward_weight(gz, x, w, *geometry), **tol(dtype, gw_ref))


def test_both_gradients_op_propagates_nan_and_inf():
    w = torch.randn(8, 6, 3, 3)
    x = torch.randn(2, 6, 9, 9)
    x[0, 1, 4, 4], x[1, 2, 0, 0] = float("nan"), float("inf")
    gz = torch.randn(2, 8, 9, 9)
    gz[1, 3, 2, 2] = float("nan")
    xr, wr = leaf(x), leaf(w)
    z = reference.conv2d(xr, wr, None, 8, 1, 1, 1)
    gx_ref, gw_ref = torch.autograd.grad(z, (xr, wr), gz)
    gx, gw = torch.ops.slimops.conv2d_backward(gz, x, w, [1, 1], [1, 1], [1, 1], 1)
    assert torch.equal(gx.isnan(), gx_ref.isnan()) and torch.equal(gw.isnan(), gw_ref.isnan())
    torch.testing.assert_close(gw, gw_ref, equal_nan=True, rtol=1e-4, atol=1e-4)


class _SlimopsCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """The slimops ops a region dispatches (the autograd engine's backward calls too)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.startswith("slimops::"):
            self.ops.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs", ["both", "input", "weight"])
def test_autograd_asks_for_both_gradients_in_one_op(needs):
    """conv2d's autograd calls conv2d_backward when the input and the weight both need a
    gradient (training), grouped or not, and the one backward op when only one does (a
    first layer's input, a frozen weight)."""
    x = torch.randn(2, 6, 9, 9, requires_grad=needs in ("both", "input"))
    w = torch.randn(8, 6, 3, 3, requires_grad=needs in ("both", "weight"))
    out = slimops.ops.conv2d(x, w, None, 8, 1, 1)
    with _SlimopsCalls() as calls:
        out.sum().backward()
    expected = {"both": ["conv2d_backward"], "input": ["conv2d_backward_input"],
                "weight": ["conv2d_backward_weight"]}[needs]
    assert calls.ops == expected
    if needs == "both":
        out = slimops.ops.conv2d(x, torch.randn(8, 3, 3, 3, requires_grad=True), None, 8, 1,
                                 1, groups=2)
        with _SlimopsCalls() as calls:
            out.sum().backward()
        assert calls.ops == ["conv2d_backward"]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available()
                    or os.environ.get("SLIMOPS_CONV_ONEDNN") == "0",
                    reason="needs oneDNN and the oneDNN route")
@pytest.mark.parametrize("i", [6, 4], ids=["full_width", "partial_width"])
def test_both_gradients_take_one_onednn_call(i, monkeypatch):
    """On the oneDNN route the pair is one convolution_backward call with both outputs, as in
    the reference style's autograd (the two backward ops make one call each)."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "onednn")
    x, w = torch.randn(2, i, 12, 12), torch.randn(8, 6, 3, 3)
    gz = torch.randn(2, 5, 12, 12)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.slimops.conv2d_backward(gz, x, w, [1, 1], [1, 1], [1, 1], 1)
    calls = [e.name for e in prof.events() if e.name == "aten::convolution_backward"]
    assert len(calls) == 1


def test_python_entry_point_both_gradients(tol, monkeypatch):
    """slimops.ops.conv2d_backward: the op on CPU, the oracle's gradients without the
    extension's kernels."""
    from slimops.ops import _backend

    w = torch.randn(12, 3, 3, 3, dtype=F64)
    x = torch.randn(2, 6, 6, 5, dtype=F64)
    gz = torch.randn(2, 9, 3, 5, dtype=F64)
    geometry = ([2, 1], [1, 1], [1, 1], 3)
    native = slimops.ops.conv2d_backward(gz, x, w, *geometry)
    monkeypatch.setattr(_backend, "use_native", lambda *_: False)
    oracle = slimops.ops.conv2d_backward(gz, x, w, *geometry)
    for got, exp in zip(native, oracle):
        torch.testing.assert_close(got, exp, **tol(F64, exp))
    assert oracle[1].shape == w.shape


def test_both_gradients_op_rejects_bad_arguments():
    op = torch.ops.slimops.conv2d_backward
    x, w, gz = torch.randn(2, 6, 9, 9), torch.randn(8, 6, 3, 3), torch.randn(2, 8, 9, 9)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="does not match the output"):
        op(gz[:, :, :8], x, w, *geometry)
    with pytest.raises(RuntimeError, match="4-D"):
        op(gz, x[0], w, *geometry)
    with pytest.raises(RuntimeError, match="grad_z"):
        op(gz.double(), x, w, *geometry)


def test_backward_ops_match_reference(tol):
    """The backward ops called directly: full-size weight gradient, zero outside the prefix."""
    w = torch.randn(12, 3, 3, 3, dtype=F64)
    x = torch.randn(2, 6, 6, 5, dtype=F64)
    gz = torch.randn(2, 9, 3, 5, dtype=F64)
    xr, wr = leaf(x), leaf(w)
    z = reference.conv2d(xr, wr, None, 9, (2, 1), 1, 1, 3)
    gx_ref, gw_ref = torch.autograd.grad(z, (xr, wr), gz)
    gx = torch.ops.slimops.conv2d_backward_input(gz, w, [2, 6, 6, 5], [2, 1], [1, 1], [1, 1], 3)
    gw = torch.ops.slimops.conv2d_backward_weight(gz, x, w, [2, 1], [1, 1], [1, 1], 3)
    torch.testing.assert_close(gx, gx_ref, **tol(F64, gx_ref))
    torch.testing.assert_close(gw, gw_ref, **tol(F64, gw_ref))
    assert gw.shape == w.shape and gw.view(3, 4, 3, 9)[:, 3:].abs().sum() == 0
    assert gw.view(3, 4, 3, 9)[:, :, 2:].abs().sum() == 0
    out = torch.randn(2, 5, 3, 4, dtype=F64) * 4
    act_out = out.clamp(0, 6)
    g = torch.randn_like(out)
    s = torch.randn(5, dtype=F64)
    expected = g * ((act_out > 0) & (act_out < 6)) * s.view(1, -1, 1, 1)
    torch.testing.assert_close(torch.ops.slimops.epilogue_backward(g, act_out, s, 2), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("case", [
    pytest.param((F32, 1, (32, 20), (16, 9), 1, (25, 1, 64, 64)), id="1x1-image-per-chunk"),
    # 7x7 planes (below kPointwiseImageColumns): 20 images side by side, then 5.
    pytest.param((F32, 1, (520, 600), (500, 560), 1, (25, 1, 7, 7)), id="1x1-images-per-chunk"),
    pytest.param((F64, 1, (500, 560), (500, 560), 1, (25, 1, 7, 7)),
                 id="full-width-1x1-images-per-chunk"),
    pytest.param((F64, 3, (16, 12), (10, 6), 2, (2, 12, 160, 160)), id="3x3-position-chunks"),
    pytest.param((F64, 3, (8, 4), (8, 4), 1, (3, 4, 9, 7)), id="full-width-one-chunk"),
    pytest.param((F64, 1, (16, 16), (16, 16), 1, (25, 16, 40, 40)), id="full-width-chunks"),
])
def test_weight_gradient_gemm_writes_every_element(case, tol, monkeypatch):
    """The kernels' GEMM weight gradient (float64, or a 1x1 at a partial width: no direct or
    Winograd path) over one or several chunks: at full width the first chunk's GEMM
    overwrites the uninitialised gradient and later ones accumulate, at a partial width all
    of it is zeroed first, so memory left over from an earlier tensor (NaN here) never
    shows."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "fixed")
    dtype, k, (rows, ig_full), (o, i), groups, xshape = case
    x = torch.randn(xshape[0], i, *xshape[2:], dtype=dtype)
    w = torch.randn(rows, ig_full // groups, k, k, dtype=dtype)
    xr, wr = leaf(x), leaf(w)
    z = reference.conv2d(xr, wr, None, o, 1, k // 2, 1, groups)
    gz = torch.randn_like(z)
    (gw_ref,) = torch.autograd.grad(z, (wr,), gz)
    for _ in range(3):
        torch.full(w.shape, float("nan"), dtype=dtype)  # freed: its memory is reused next
        gw = torch.ops.slimops.conv2d_backward_weight(gz, x, w, [1, 1], [k // 2] * 2, [1, 1],
                                                      groups)
        torch.testing.assert_close(gw, gw_ref, **tol(dtype, gw_ref))


# --------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


COMPILE_CASES = {
    "g1_bias": (1, dict(), None),
    "g3_shift_residual": (3, dict(shift=True, residual=True), None),
    "g1_scale_relu": (1, dict(scale=True, shift=True), "relu"),
    "g3_relu6_residual": (3, dict(residual=True), "relu6"),
}


@pytest.mark.parametrize("groups,extra,act", list(COMPILE_CASES.values()), ids=list(COMPILE_CASES))
def test_compile(groups, extra, act, fresh_dynamo, tol):
    dtype = F32
    w = torch.randn(12, 4, 3, 3, dtype=dtype)
    o, i = (6, 6) if groups == 3 else (5, 3)
    x = torch.randn(2, i, 7, 6, dtype=dtype)
    tensors = dict(input=x, weight=w, bias=torch.randn(12, dtype=dtype))
    if extra.get("scale"):
        tensors["scale"] = torch.rand(o, dtype=dtype) + 0.5
    if extra.get("shift"):
        tensors["shift"] = torch.randn(o, dtype=dtype)
    if extra.get("residual"):
        tensors["residual"] = torch.randn(2, o, 4, 6, dtype=dtype)
    g = torch.randn(2, o, 4, 6, dtype=dtype)

    def fn(**t):
        y = slimops.ops.conv2d(out_channels=o, stride=(2, 1), padding=1, groups=groups,
                               activation=act, **t)
        return (y * g).sum(), y

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = {k: leaf(v) for k, v in tensors.items()}
        loss, y = f(**leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        results.append((y, grads))
    (y_e, g_e), (y_c, g_c) = results
    torch.testing.assert_close(y_c, y_e, **tol(dtype, y_e))
    for name, a, b in zip(tensors, g_c, g_e):
        torch.testing.assert_close(a, b, **tol(dtype, b), msg=lambda m: f"{name}: {m}")


def test_compile_forward_full_epilogue_no_grad(fresh_dynamo, tol):
    """Inference under torch.compile with every epilogue piece (no backward needed)."""
    w = torch.randn(12, 4, 3, 3)
    args = (torch.randn(3, 6, 7, 7), w, torch.randn(12), 9, 2, 1, 1, 3, torch.rand(9) + 0.5,
            torch.randn(9), torch.randn(3, 9, 4, 4), "relu6")
    compiled = torch.compile(slimops.ops.conv2d, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), slimops.ops.conv2d(*args), **tol(F32))


@pytest.mark.skipif(os.environ.get("SLIMOPS_CONV_ONEDNN") == "0"
                    or "SLIMOPS_CPU_ISA" in os.environ,
                    reason="already a subprocess run of this file")
def test_every_conv2d_test_passes_without_the_onednn_route():
    # Full-input-width float32 convs run on oneDNN by default (csrc/cpu/conv2d.cpp,
    # use_onednn); SLIMOPS_CONV_ONEDNN=0 sends them through im2col + GEMM, which the
    # partial widths always take. Both paths must pass the same tests.
    env = dict(os.environ, SLIMOPS_CONV_ONEDNN="0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             __file__], env=env, capture_output=True, text=True, timeout=900,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("side", [8, 34], ids=["small_plane", "large_plane"])
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
def test_full_width_backward_on_onednn(stride, side, tol):
    # Full input width, float32, 3x3: forward and both backward ops take the oneDNN route
    # (csrc/cpu/conv2d.cpp, use_onednn), small planes too; the grads must match the reference
    # like every other path.
    h = side * stride
    kwargs = dict(input=leaf(torch.randn(2, 5, h, h)), weight=leaf(torch.randn(7, 5, 3, 3)),
                  bias=leaf(torch.randn(7)), out_channels=6, stride=stride, padding=1,
                  shift=leaf(torch.randn(6)), activation="relu")
    run_and_compare(kwargs, tol)


@pytest.mark.parametrize("kwargs, match", [
    (dict(out_channels=True), "out_channels must be an int, got True"),
    (dict(out_channels=2.0), "out_channels must be an int, got 2.0"),
    (dict(groups=True), "groups must be an int, got True"),
    (dict(stride=1.5), "stride must be an int, got 1.5"),
    (dict(padding=(1, True)), "padding must be an int, got True"),
    (dict(dilation="1"), "dilation must be an int"),
])
def test_non_integer_sizes_are_type_errors(kwargs, match):
    """A bool or a float is not silently an int (out_channels=True ran as 1 before)."""
    x, w = torch.randn(1, 4, 6, 6), torch.randn(6, 4, 3, 3)
    with pytest.raises(TypeError, match=match):
        slimops.ops.conv2d(x, w, **kwargs)


def test_numpy_integer_sizes_are_accepted():
    import numpy as np

    x, w = torch.randn(1, 4, 6, 6), torch.randn(6, 4, 3, 3)
    got = slimops.ops.conv2d(x, w, None, np.int64(4), stride=np.int32(1), padding=(1, np.int8(1)))
    torch.testing.assert_close(got, reference.conv2d(x, w, None, 4, 1, 1))
