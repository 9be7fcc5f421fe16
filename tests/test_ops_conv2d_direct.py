"""The direct convolution kernels (csrc/cpu/conv2d_direct.cpp) behind slimops::conv2d and its
backward ops: float32 dense convs at a partial input width on planes of 12 columns and more.

Every case runs the op twice, on the direct kernels and with SLIMOPS_CONV_DIRECT=0 (im2col +
GEMM; the switch is read on every call), and checks both against the reference, forward and
every gradient. test_direct_path_is_taken shows that the switch does change the path.
test_cpu_isa.py runs this file again under the AVX2 and baseline caps."""
from __future__ import annotations

import pytest
import torch

import slimops
from slimops import reference

from helpers import check_conv2d_switch, run_with_grads

pytestmark = pytest.mark.skipif(
    slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
)

# The direct kernels exist for AVX2 and AVX-512 only (csrc/cpu/isa.h); under the baseline cap
# the op takes the GEMM path, which these tests then check on the same shapes.
HAS_DIRECT = slimops.backend_info().get("cpu_isa", "base") in ("avx2", "avx512")


def _run(kwargs, grad_out, direct, monkeypatch):
    monkeypatch.setenv("SLIMOPS_CONV_DIRECT", "1" if direct else "0")
    return run_with_grads(slimops.ops.conv2d, kwargs, grad_out)


def _reference(kwargs, grad_out):
    return run_with_grads(reference.conv2d, kwargs, grad_out)


def check_both_paths(kwargs, monkeypatch, tol):
    """Forward and every gradient on the direct kernels and on the GEMM path, each against the
    reference; returns both paths' (output, gradients)."""
    return check_conv2d_switch(kwargs, monkeypatch, tol, "SLIMOPS_CONV_DIRECT")


def _differs(a, b):
    return not torch.equal(a, b)


# (channels in/out of the active prefix, full weight in/out, input H x W, kernel, stride,
#  padding, dilation, groups). Planes of 12+ output columns, odd sizes, every stride and
# dilation the tiles special-case (3x3 with column stride 1 or 2) and some they do not.
CASES = {
    "k3_s1_56": (16, 24, 24, 32, (30, 56), (3, 3), 1, 1, 1, 1),
    "k3_s1_odd": (7, 9, 11, 12, (17, 29), (3, 3), 1, 1, 1, 1),
    "k3_s2": (8, 12, 16, 16, (33, 45), (3, 3), 2, 1, 1, 1),
    "k3_s21": (6, 10, 8, 12, (20, 27), (3, 3), (2, 1), 1, 1, 1),
    "k3_s12": (6, 10, 8, 12, (20, 50), (3, 3), (1, 2), 1, 1, 1),
    "k3_d2": (5, 7, 8, 8, (21, 31), (3, 3), 1, 2, 2, 1),
    "k3_p0": (9, 8, 12, 8, (16, 23), (3, 3), 1, 0, 1, 1),
    "k3_p2_s3": (4, 6, 4, 6, (25, 64), (3, 3), 3, 2, 1, 1),
    "k53": (5, 6, 8, 8, (19, 26), (5, 3), 1, (2, 1), 1, 1),
    "k35_d12": (5, 6, 8, 8, (19, 40), (3, 5), (1, 2), (1, 2), (1, 2), 1),
    "k2_s2": (6, 5, 6, 8, (20, 48), (2, 2), 2, 0, 1, 1),
    "channel_blocks": (33, 20, 40, 24, (14, 30), (3, 3), 1, 1, 1, 1),  # 3 blocks of <= 16
    "groups2": (8, 10, 12, 12, (15, 26), (3, 3), 1, 1, 1, 2),
    "batch5": (4, 12, 8, 16, (13, 20), (3, 3), 2, 1, 1, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_matches_reference(case, monkeypatch, tol):
    ci, co, wi, wo, (h, w), kernel, stride, padding, dilation, groups = CASES[case]
    n = 5 if case == "batch5" else 2
    weight = torch.randn(wo, wi // groups, *kernel)
    kwargs = dict(input=torch.randn(n, ci, h, w), weight=weight, bias=None, out_channels=co,
                  stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_both_paths(kwargs, monkeypatch, tol)


@pytest.mark.skipif(not HAS_DIRECT, reason="no direct kernels under the baseline cap")
@pytest.mark.parametrize("stride", [1, 2])
def test_direct_path_is_taken(stride, monkeypatch, tol):
    """On a shape every pass of which takes the direct kernels under both instruction sets
    (16 -> 16 channels of a 32-channel weight, 32 output columns; the input gradient only at
    stride 1), the gradients of the two paths differ in their last bits: they sum in different
    orders (the weight gradient along vector lanes, the input gradient tap-major), so
    identical results would mean the direct kernels never ran. The forward cannot be told
    apart this way: both paths add the channel-major taps one after another with fused
    multiply-adds, and agree to the bit."""
    weight = torch.randn(32, 32, 3, 3)
    kwargs = dict(input=torch.randn(2, 16, 32 * stride, 32 * stride), weight=weight, bias=None,
                  out_channels=16, stride=stride, padding=1, dilation=1, groups=1)
    (d_out, d_grads), (g_out, g_grads) = check_both_paths(kwargs, monkeypatch, tol)
    assert _differs(d_grads["weight"], g_grads["weight"])
    if stride == 1:
        assert _differs(d_grads["input"], g_grads["input"])


@pytest.mark.parametrize("threads", ["one_thread", "all_threads"])
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_direct_epilogue(act, threads, request, monkeypatch, tol):
    request.getfixturevalue(threads)
    weight = torch.randn(24, 20, 3, 3)
    o = 18
    kwargs = dict(input=torch.randn(2, 13, 28, 28), weight=weight, bias=torch.randn(24),
                  out_channels=o, stride=1, padding=1, dilation=1, groups=1,
                  scale=torch.rand(o) + 0.5, shift=torch.randn(o),
                  residual=torch.randn(2, o, 28, 28), activation=act)
    check_both_paths(kwargs, monkeypatch, tol)


def test_direct_many_bands_and_tasks(all_threads, monkeypatch, tol):
    """A tall plane with many channels: several row bands per image and several channel chunks
    per task (the forward's field budget), and the weight gradient's row bands."""
    weight = torch.randn(80, 40, 3, 3)
    kwargs = dict(input=torch.randn(1, 30, 120, 40), weight=weight, bias=None, out_channels=70,
                  stride=1, padding=1, dilation=1, groups=1)
    check_both_paths(kwargs, monkeypatch, tol)


def test_direct_weight_gradient_ignores_columns_a_stride_skips(monkeypatch):
    """Stride 2 over an even width leaves the last input column unread by the conv. An Inf
    there must not reach any gradient (a lane past the last output column reads it; the tile
    masks that lane rather than multiplying it by zero, which would give NaN)."""
    weight = torch.randn(12, 8, 3, 3)
    x = torch.randn(2, 6, 16, 32)
    x[:, :, :, -1] = float("inf")
    kwargs = dict(input=x, weight=weight, bias=None, out_channels=10, stride=2, padding=0,
                  dilation=1, groups=1)
    g = torch.randn_like(reference.conv2d(**kwargs))
    ref, ref_grads = _reference(kwargs, g)
    for direct in (True, False):
        out, grads = _run(kwargs, g, direct, monkeypatch)
        assert torch.isfinite(out).all() and torch.isfinite(grads["weight"]).all()
        torch.testing.assert_close(grads["weight"], ref_grads["weight"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_direct_propagates_non_finite_values_as_torch(value, monkeypatch):
    """A NaN or Inf inside the read extent reaches the same outputs and gradient entries as in
    the reference (same positions non-finite, same signs for Inf)."""
    weight = torch.randn(12, 8, 3, 3)
    x = torch.randn(2, 6, 16, 30)
    x[1, 2, 7, 11] = value
    kwargs = dict(input=x, weight=weight, bias=None, out_channels=10, stride=1, padding=1,
                  dilation=1, groups=1)
    g = torch.randn_like(reference.conv2d(**kwargs)).abs() + 0.1
    ref, ref_grads = _reference(kwargs, g)
    out, grads = _run(kwargs, g, True, monkeypatch)
    for got, exp in [(out, ref), (grads["weight"], ref_grads["weight"]),
                     (grads["input"], ref_grads["input"])]:
        assert torch.equal(torch.isnan(got), torch.isnan(exp))
        assert torch.equal(torch.isposinf(got), torch.isposinf(exp))
        assert torch.equal(torch.isneginf(got), torch.isneginf(exp))


@pytest.mark.parametrize("stride", [1, 2])
def test_direct_reads_the_weight_prefix_in_place(stride, monkeypatch):
    """No copy of the shared weight, whole or prefix, in the forward and backward ops on the
    direct path (test_ops_no_weight_copy.py's profiler check, on a shape that takes it)."""
    from test_ops_no_weight_copy import assert_no_weight_copy, conv_weight_shapes, profiled

    monkeypatch.setenv("SLIMOPS_CONV_DIRECT", "1")
    weight = torch.randn(32, 32, 3, 3, requires_grad=True)
    x = torch.randn(2, 16, 32 * stride, 32 * stride, requires_grad=True)

    def run():
        out = slimops.ops.conv2d(x, weight, None, 16, stride, 1)
        torch.autograd.grad(out, (x, weight), torch.randn_like(out))

    assert_no_weight_copy(profiled(run), conv_weight_shapes(weight.shape, 1, 16, 16),
                          ["slimops::conv2d", "slimops::conv2d_backward"])
