"""The Winograd F(4x4, 3x3) kernels (csrc/cpu/conv2d_winograd.cpp) behind slimops::conv2d and
its backward ops: float32 3x3 stride-1 dense convs with enough channels and output tiles.

SLIMOPS_CONV_WINOGRAD (read on every call) picks them: 1 wherever they suit, 0 never, unset
only under the measured route (SLIMOPS_CONV_ROUTE=auto; the tests pin the fixed route, which
takes the kernels at a partial input width). Every case runs the op with 1 and with 0 and
checks both against the reference, forward and every gradient; test_winograd_path_is_taken
shows that the switch changes the path. test_cpu_isa.py runs this file again under the AVX2
and baseline caps."""
from __future__ import annotations

import pytest
import torch

import slimops
from slimops import reference

from helpers import check_conv2d_switch, run_with_grads

pytestmark = pytest.mark.skipif(
    slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
)


def _run(kwargs, grad_out, winograd, monkeypatch):
    monkeypatch.setenv("SLIMOPS_CONV_WINOGRAD", "1" if winograd else "0")
    return run_with_grads(slimops.ops.conv2d, kwargs, grad_out)


def _reference(kwargs, grad_out):
    return run_with_grads(reference.conv2d, kwargs, grad_out)


# The Winograd kernels' float32 error, measured as max |error| / max |exact| (float64 exact)
# for the output and both gradients at 64-256 channels on 28x28, on a 2-core Intel Xeon
# (AVX-512): 0.55-1.4e-5, against 0.03-0.2e-5 for the direct kernels; it grows with the
# channels summed and does not depend on the ISA cap (the transforms' rounding is the same;
# the GEMMs are MKL's). The shared float32 tolerance (1e-5 of the largest magnitude) sits
# inside that range (one output of test_winograd_weight_gradient_over_several_chunks was
# 1.07x over it on that Xeon, none on the AMD EPYC Zen 3), so these tests allow 4e-5 on the
# Winograd path (a wrong transform or tile is off by O(1) of the scale) and keep the shared
# one for the other path.
WINOGRAD_ATOL_FACTOR = 4.0


def check_both_paths(kwargs, monkeypatch, tol):
    """Forward and every gradient with and without the Winograd kernels, each against the
    reference; returns both paths' (output, gradients)."""
    def winograd_tol(dtype, like=None):
        t = tol(dtype, like)
        return dict(t, atol=t["atol"] * WINOGRAD_ATOL_FACTOR)

    return check_conv2d_switch(kwargs, monkeypatch, tol, "SLIMOPS_CONV_WINOGRAD",
                               tol_on=winograd_tol)


def conv_kwargs(n, ci, co, wi, wo, h, w, padding, **extra):
    """A 3x3 stride-1 conv of the first ci -> co channels of a [wo, wi, 3, 3] weight."""
    return dict(input=torch.randn(n, ci, h, w), weight=torch.randn(wo, wi, 3, 3) * 0.1,
                bias=None, out_channels=co, stride=1, padding=padding, dilation=1, groups=1,
                **extra)


# (batch, channels in/out of the active prefix, full weight in/out, input H x W, padding):
# every case has at least 48 output tiles and C * O >= 16 (C + O) (winograd_suits).
CASES = {
    "p1_14": (4, 64, 64, 80, 72, (14, 14), 1),
    "p1_odd": (3, 67, 70, 72, 80, (17, 23), 1),        # partial tiles on both edges
    "p0": (2, 64, 96, 72, 96, (30, 21), 0),
    "p2": (2, 96, 64, 128, 64, (13, 19), 2),           # output larger than the input
    "wide_row": (1, 64, 64, 65, 65, (9, 150), 1),      # long tile rows (38 tiles)
    "chunks": (2, 64, 64, 72, 72, (64, 64), 1),        # 512 tiles: forward blocks split rows
    "c32": (2, 32, 32, 40, 48, (28, 28), 1),           # the smallest channel counts taken
    "c24_48": (1, 24, 48, 32, 56, (30, 30), 1),        # C * O = 16 (C + O); partial vectors
}


@pytest.mark.parametrize("case", list(CASES))
def test_winograd_matches_reference(case, monkeypatch, tol):
    n, ci, co, wi, wo, (h, w), padding = CASES[case]
    check_both_paths(conv_kwargs(n, ci, co, wi, wo, h, w, padding), monkeypatch, tol)


def test_winograd_weight_gradient_over_several_chunks(all_threads, monkeypatch, tol):
    """256 -> 256 channels over 512 tiles: the weight gradient's chunks (455 tiles each) are
    accumulated in order, the second one over a partial tile row; the forward's blocks (52
    tiles) split tile rows between threads, each writing only its own tiles' columns."""
    check_both_paths(conv_kwargs(2, 256, 256, 264, 260, 64, 64, 1), monkeypatch, tol)


@pytest.mark.parametrize("threads", ["one_thread", "all_threads"])
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_winograd_epilogue(act, threads, request, monkeypatch, tol):
    """Bias, BN scale and shift, residual and activation, applied on each tile row's outputs."""
    request.getfixturevalue(threads)
    o = 70
    kwargs = conv_kwargs(2, 64, o, 72, 80, 22, 26, 1, scale=torch.rand(o) + 0.5,
                         shift=torch.randn(o), residual=torch.randn(2, o, 22, 26),
                         activation=act)
    kwargs["bias"] = torch.randn(80)
    check_both_paths(kwargs, monkeypatch, tol)


def test_winograd_path_is_taken(monkeypatch, tol):
    """The transforms round differently from a direct sum, so the two paths' forward and
    gradients differ in their last bits where the Winograd kernels run (identical results
    would mean they never ran), and agree to the bit where a shape does not suit them (fewer
    than 48 tiles)."""
    (w_out, w_grads), (d_out, d_grads) = check_both_paths(
        conv_kwargs(4, 64, 64, 80, 72, 14, 14, 1), monkeypatch, tol)
    assert not torch.equal(w_out, d_out)
    assert not torch.equal(w_grads["input"], d_grads["input"])
    assert not torch.equal(w_grads["weight"], d_grads["weight"])
    (w_out, _), (d_out, _) = check_both_paths(
        conv_kwargs(2, 32, 32, 40, 48, 28, 28, 1), monkeypatch, tol)  # C * O = 16 (C + O)
    assert not torch.equal(w_out, d_out)
    (w_out, w_grads), (d_out, d_grads) = check_both_paths(
        conv_kwargs(1, 64, 64, 80, 72, 14, 14, 1), monkeypatch, tol)  # 16 tiles
    assert torch.equal(w_out, d_out)
    assert torch.equal(w_grads["weight"], d_grads["weight"])


def test_winograd_is_off_under_the_fixed_route_by_default(monkeypatch, tol):
    """Unset, SLIMOPS_CONV_WINOGRAD leaves the fixed route's arithmetic exact (what the tests
    pin): the results equal the =0 path's to the bit."""
    kwargs = conv_kwargs(4, 64, 64, 80, 72, 14, 14, 1)
    g = torch.randn_like(reference.conv2d(**kwargs))
    off_out, off_grads = _run(kwargs, g, False, monkeypatch)
    monkeypatch.delenv("SLIMOPS_CONV_WINOGRAD")
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "fixed")
    out, grads = run_with_grads(slimops.ops.conv2d, kwargs, g)
    assert torch.equal(out, off_out)
    for name in ("input", "weight"):
        assert torch.equal(grads[name], off_grads[name])


def test_winograd_is_deterministic(all_threads, monkeypatch):
    """Same inputs, same bits: every task writes its own outputs, the weight gradient sums
    its chunks in order."""
    kwargs = conv_kwargs(2, 64, 64, 72, 72, 40, 40, 1)
    g = torch.randn_like(reference.conv2d(**kwargs))
    first = _run(kwargs, g, True, monkeypatch)
    second = _run(kwargs, g, True, monkeypatch)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name])


def _same_non_finite(got, exp):
    assert torch.equal(torch.isnan(got), torch.isnan(exp))
    assert torch.equal(torch.isposinf(got), torch.isposinf(exp))
    assert torch.equal(torch.isneginf(got), torch.isneginf(exp))
    finite = torch.isfinite(exp)
    torch.testing.assert_close(got[finite], exp[finite], rtol=1e-4,
                               atol=1e-5 * max(1.0, float(exp[finite].abs().max())))


@pytest.mark.parametrize("where", ["input", "weight", "grad"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 3e38])
def test_winograd_hands_non_finite_and_huge_values_to_the_other_kernels(where, value,
                                                                       monkeypatch):
    """A transform mixes a tile's values, so an Inf would turn outputs that never read it into
    NaN, and a huge finite value could overflow where the direct sum does not. A pass that
    meets such a value runs on the other kernels instead: its non-finite entries are those of
    SLIMOPS_CONV_WINOGRAD=0, and (for a value in the input or the output gradient, where those
    kernels are torch's match) of the reference. A NaN weight is compared with the other
    kernels only: im2col + GEMM multiplies it by the zero padding (NaN) where the reference's
    oneDNN skips the padding."""
    kwargs = conv_kwargs(4, 64, 64, 80, 72, 14, 14, 1)
    g = torch.randn_like(reference.conv2d(**kwargs)).abs() + 0.1
    if where == "input":
        kwargs["input"][1, 2, 7, 11] = value
    elif where == "weight":
        kwargs["weight"][3, 5, 1, 2] = value
    else:
        g[2, 6, 4, 9] = value
    out, grads = _run(kwargs, g, True, monkeypatch)
    other_out, other_grads = _run(kwargs, g, False, monkeypatch)
    ref, ref_grads = _reference(kwargs, g)
    for name, got, other, exp in [("out", out, other_out, ref)] + [
            (k, grads[k], other_grads[k], ref_grads[k]) for k in ("input", "weight")]:
        _same_non_finite(got.detach(), other.detach())
        if where != "weight":
            _same_non_finite(got.detach(), exp.detach())


def test_winograd_reads_the_weight_prefix_in_place(monkeypatch):
    """No copy of the shared weight, whole or prefix, in the forward and backward ops on the
    Winograd path (test_ops_no_weight_copy.py's profiler check): the filters' transform reads
    the prefix through its strides."""
    from test_ops_no_weight_copy import assert_no_weight_copy, conv_weight_shapes, profiled

    monkeypatch.setenv("SLIMOPS_CONV_WINOGRAD", "1")
    weight = torch.randn(80, 72, 3, 3, requires_grad=True)
    x = torch.randn(4, 64, 14, 14, requires_grad=True)

    def run():
        out = slimops.ops.conv2d(x, weight, None, 64, 1, 1)
        torch.autograd.grad(out, (x, weight), torch.randn_like(out))

    assert_no_weight_copy(profiled(run), conv_weight_shapes(weight.shape, 1, 64, 64),
                          ["slimops::conv2d", "slimops::conv2d_backward"])


def test_winograd_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("SLIMOPS_CONV_WINOGRAD", "yes")
    kwargs = conv_kwargs(4, 64, 64, 80, 72, 14, 14, 1)
    with pytest.raises(RuntimeError, match="SLIMOPS_CONV_WINOGRAD must be auto, 0 or 1"):
        slimops.ops.conv2d(**kwargs)
