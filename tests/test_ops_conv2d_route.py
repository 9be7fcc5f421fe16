"""The conv passes' route between slimops' kernels and oneDNN (csrc/cpu/route.h).

``SLIMOPS_CONV_ROUTE=onednn`` forces oneDNN wherever it applies (float32), so its results are
checked here against the reference at partial and full widths, with and without groups, with
every part of the epilogue; ``auto`` (the default outside the test suite) measures both
routes on the first call of each shape and keeps the faster; ``fixed`` (the suite's setting,
tests/conftest.py) never measures. The oneDNN route copies the weight prefix for the forward and the input
gradient at a partial width (as the reference style does), never for the weight gradient.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import slimops
from slimops import reference

from test_ops_no_weight_copy import conv_weight_shapes, weight_copies

pytestmark = [
    pytest.mark.skipif(slimops.backend_info()["cpu"] != "C++",
                       reason="needs the compiled extension slimops._C"),
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN"),
]


def _routes():
    onednn, kernels, _ = torch.ops.slimops.conv2d_routes(False)
    return onednn + kernels


def _rounds():
    return torch.ops.slimops.conv2d_routes(False)[2]


def _check(x, weight, o, stride, padding, dilation, epilogue, tol, groups=1):
    """Forward and the three gradients of slimops.ops.conv2d against the reference."""
    def run(op):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
        extra = {k: (v.detach().clone().requires_grad_() if v is not None else None)
                 for k, v in epilogue.items() if k != "activation"}
        out = op(leaves[0], leaves[1], None, o, stride, padding, dilation, groups,
                 extra["scale"], extra["shift"], extra["residual"], epilogue["activation"])
        wanted = leaves + [v for v in extra.values() if v is not None]
        g = torch.linspace(-1, 1, out.numel()).view_as(out)
        return out, torch.autograd.grad(out, wanted, g)

    out, grads = run(slimops.ops.conv2d)
    exp, exp_grads = run(reference.conv2d)
    torch.testing.assert_close(out, exp, **tol(torch.float32, exp))
    for got, e in zip(grads, exp_grads):
        torch.testing.assert_close(got, e, **tol(torch.float32, e))


def _epilogue(with_epilogue, N, o, H, W, k, s, p, d):
    """No epilogue, or every part of it (scale, shift, residual, relu) for o channels."""
    if not with_epilogue:
        return dict(scale=None, shift=None, residual=None, activation=None)
    Ho = (H + 2 * p - d * (k - 1) - 1) // s + 1
    Wo = (W + 2 * p - d * (k - 1) - 1) // s + 1
    return dict(scale=torch.rand(o) + 0.5, shift=torch.randn(o),
                residual=torch.randn(N, o, Ho, Wo), activation="relu")


CASES = [
    # (I_full, O_full, i, o, kernel, stride, padding, dilation, H, W, N)
    (16, 24, 8, 12, 3, 1, 1, 1, 9, 11, 3),     # partial width, 3x3
    (16, 24, 16, 12, 3, 2, 1, 1, 13, 8, 2),    # full input width, stride 2
    (32, 32, 20, 32, 1, 1, 0, 1, 15, 15, 4),   # partial pointwise
    (8, 8, 5, 7, 3, 2, 2, 2, 11, 12, 2),       # stride, padding and dilation 2
    (12, 12, 7, 5, 5, 1, 3, 1, 7, 6, 1),       # 5x5, padding over the kernel's reach
    (8, 16, 8, 16, 3, 1, 1, 1, 6, 7, 2),       # full width: oneDNN's weight gradient as is
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("with_epilogue", [False, True], ids=["plain", "epilogue"])
def test_onednn_route_matches_reference(case, with_epilogue, monkeypatch, tol):
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "onednn")
    I, O, i, o, k, s, p, d, H, W, N = case
    x = torch.randn(N, i, H, W)
    weight = torch.randn(O, I, k, k)
    epilogue = _epilogue(with_epilogue, N, o, H, W, k, s, p, d)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        slimops.ops.conv2d(x, weight, None, o, s, p, d)
    assert "aten::convolution" in {e.name for e in prof.events()}, "oneDNN did not run"
    _check(x, weight, o, s, p, d, epilogue, tol)


# (groups, I_full, O_full, i, o, kernel, stride, padding, dilation, H, W, N); the weight is
# [O_full, I_full / groups, k, k] and group g uses rows g*O_full/groups + [0, o/groups).
GROUPED_CASES = [
    (2, 16, 24, 8, 12, 3, 1, 1, 1, 9, 11, 3),    # partial width: each group's block prefix
    (4, 32, 32, 32, 32, 3, 2, 1, 1, 10, 9, 2),   # full width: the shared weight as is
    (2, 16, 24, 16, 12, 1, 1, 0, 1, 7, 7, 2),    # full input width, partial output, 1x1
    (3, 12, 18, 6, 9, 5, 1, 3, 2, 11, 10, 1),    # 5x5, dilation 2, padding over the reach
]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=[f"g{c[0]}case{i}"
                                                     for i, c in enumerate(GROUPED_CASES)])
@pytest.mark.parametrize("with_epilogue", [False, True], ids=["plain", "epilogue"])
def test_onednn_route_runs_grouped_convs(case, with_epilogue, monkeypatch, tol):
    """Grouped convs take oneDNN's grouped convolution on the gathered block prefixes (the
    reference style's F.conv2d(groups=G)); the weight gradient lands in each group's block."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "onednn")
    G, I, O, i, o, k, s, p, d, H, W, N = case
    x = torch.randn(N, i, H, W)
    weight = torch.randn(O, I // G, k, k)
    epilogue = _epilogue(with_epilogue, N, o, H, W, k, s, p, d)
    xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = slimops.ops.conv2d(xg, wg, None, o, s, p, d, G)
        out.backward(torch.randn_like(out))
    names = [e.name for e in prof.events()]
    assert "aten::convolution" in names, "oneDNN did not run the forward"
    assert "aten::convolution_backward" in names, "oneDNN did not run the gradients"
    _check(x, weight, o, s, p, d, epilogue, tol, groups=G)


@pytest.mark.parametrize("groups,o,i", [(1, 12, 8), (1, 24, 16), (2, 12, 8), (2, 24, 16)],
                         ids=["g1-partial", "g1-full", "g2-partial", "g2-full"])
def test_onednn_route_adds_a_lone_bias_itself(groups, o, i, monkeypatch, tol):
    """A bias with no other epilogue goes into oneDNN's convolution (the reference style's
    call): the active channels' bias rows, gathered per group; values and gradients as the
    reference."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "onednn")
    weight = torch.randn(24, 16 // groups, 3, 3, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    x = torch.randn(2, i, 9, 9, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = slimops.ops.conv2d(x, weight, bias, o, 1, 1, 1, groups)
    convs = [e for e in prof.events() if e.name == "aten::convolution"]
    assert convs and convs[0].input_shapes[2] == [o], "the bias did not go to oneDNN"
    exp = reference.conv2d(x, weight, bias, o, [1, 1], [1, 1], [1, 1], groups, None, None,
                           None, None)
    torch.testing.assert_close(out, exp, **tol(torch.float32, exp))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, bias), g)
    want = torch.autograd.grad(exp, (x, weight, bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol(torch.float32, b))


def test_grouped_onednn_route_copies_no_weight_at_full_width(monkeypatch):
    """At full width the grouped conv hands oneDNN the shared weight itself; at a partial
    width it gathers the groups' block prefixes (the reference style's copy)."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "onednn")
    weight = torch.randn(24, 8, 3, 3)
    for o, i, copied in ((24, 16, False), (12, 8, True)):
        x = torch.randn(2, i, 9, 9)
        shapes = conv_weight_shapes(weight.shape, 2, o, i)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            slimops.ops.conv2d(x, weight, None, o, 1, 1, 1, 2)
        assert bool(weight_copies(prof, shapes)) == copied, (o, i)


@pytest.mark.parametrize("op", ["conv2d", "grouped_conv2d", "depthwise_conv2d"])
def test_onednn_route_hands_over_the_full_width_tensors_themselves(op, monkeypatch):
    """At full width the oneDNN route passes the shared weight and bias as they are, without
    the views a prefix needs (each a dispatcher call: ~1.3 us per call together), and at a
    partial width it takes the prefix."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "onednn")
    depthwise = op == "depthwise_conv2d"
    groups = 2 if op == "grouped_conv2d" else 1
    weight = torch.randn(16, 1, 3, 3) if depthwise else torch.randn(16, 8 // groups, 3, 3)
    bias = torch.randn(16)

    def views(channels, in_channels):
        x = torch.randn(2, channels if depthwise else in_channels, 9, 9)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if depthwise:
                out = slimops.ops.depthwise_conv2d(x, weight, bias, 1, 1, 1)
            else:
                out = slimops.ops.conv2d(x, weight, bias, channels, 1, 1, 1, groups)
        assert out.shape[1] == channels
        return [e.name for e in prof.events() if e.name in ("aten::narrow", "aten::slice")]

    assert views(16, 8) == []
    assert views(8, 8 if depthwise else 4)


def test_auto_measures_each_pass_once_per_shape(monkeypatch, tol):
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "auto")
    torch.ops.slimops.conv2d_routes(True)
    # 2 * 24 * 24 * 16 * 16*9 = 2.65M multiply-adds: above the measuring threshold.
    x, weight = torch.randn(2, 16, 24, 24), torch.randn(32, 32, 3, 3)
    epilogue = dict(scale=None, shift=torch.randn(16), residual=None, activation="relu6")
    for _ in range(3):  # the first call measures; the others reuse the choice
        _check(x, weight, 16, 1, 1, 1, epilogue, tol)
    # forward (with its epilogue), the two gradients as a pair (conv2d_backward) and, run
    # apart inside the pair's measurement, the input and the weight gradient; the reference
    # ran no slimops op
    assert _routes() == 4
    info = slimops.backend_info()
    assert info["conv_route"] == "auto"
    assert sum(info["conv_routes_measured"].values()) == 4
    # the first call's measurement of each pass (the in-place windows, from the 2nd call
    # after it, span six calls: none has completed)
    assert _rounds() == 4
    assert torch.ops.slimops.conv2d_routes(True) != [0, 0, 0] and _routes() == _rounds() == 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_pair_measurement_reuses_the_passes_own_times(monkeypatch):
    """The gradient pair's first measurement times oneDNN's one call for both against the
    passes apart by the passes' own measurements (route.h kernels_best): oneDNN runs four
    times for each pass (one untimed, three timed) and four times for the pair, and the
    passes apart run once, whatever routes they chose (before, three more times: 12 calls
    plus three per pass that chose oneDNN)."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "auto")
    torch.ops.slimops.conv2d_routes(True)
    # full input width (oneDNN possible for every pass), 58M multiply-adds per pass: on a
    # 2-core Zen 3 both passes chose oneDNN, and the pair's measurement made 18 calls before
    x, weight = torch.randn(2, 64, 28, 28), torch.randn(64, 64, 3, 3)
    gz = torch.randn(2, 64, 28, 28)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gx, gw = torch.ops.slimops.conv2d_backward(gz, x, weight, [1, 1], [1, 1], [1, 1], 1)
    calls = [e for e in prof.events() if e.name == "aten::convolution_backward"]
    assert len(calls) == 4 + 4 + 4
    assert _rounds() == 3  # the two passes and the pair
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    z = torch.nn.functional.conv2d(*leaves, padding=1)
    exp = torch.autograd.grad(z, leaves, gz)
    torch.testing.assert_close(gx, exp[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, exp[1], rtol=1e-4, atol=1e-4)
    torch.ops.slimops.conv2d_routes(True)


def _forward_runs_onednn(call) -> bool:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return "aten::convolution" in {e.name for e in prof.events()}


def test_auto_times_both_routes_in_place_on_later_calls(monkeypatch):
    """After the first measurement (the candidates back to back), windows of six calls time
    the routes in place, as each call finds its operands, alternating the kernels and oneDNN:
    from the 2nd call after it, then from the 16th, 64th, 256th, 1024th and 4096th (route.h);
    each window call returns its route's result, as any other call. (Passes whose routes'
    back-to-back times are far apart skip the windows before the 256th call, unless
    ``SLIMOPS_CONV_ROUTE_EARLY_WINDOWS=1``: see the next test.)"""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "auto")
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE_EARLY_WINDOWS", "1")
    torch.ops.slimops.conv2d_routes(True)
    x, weight = torch.randn(2, 16, 24, 24), torch.randn(32, 32, 3, 3)
    expected = reference.conv2d(x, weight, None, 16, 1, 1, 1)

    def call():
        with torch.no_grad():
            out = slimops.ops.conv2d(x, weight, None, 16, 1, 1, 1)  # the forward pass only
        torch.testing.assert_close(out, expected)

    def window():  # six calls: which of them ran oneDNN
        return [_forward_runs_onednn(call) for _ in range(6)]

    call()
    assert (_routes(), _rounds()) == (1, 1)
    call()  # the 1st call after the first measurement: its chosen route
    assert window() == [False, True] * 3  # calls 2-7: the kernels, oneDNN, ...
    assert (_routes(), _rounds()) == (1, 2)  # the window completed a measurement
    for _ in range(16 - 8):  # the chosen route, untimed
        call()
    assert _rounds() == 2
    assert window() == [False, True] * 3  # from the 16th call after the first
    assert _rounds() == 3
    for _ in range(64 - 22):
        call()
    assert _rounds() == 3
    assert window() == [False, True] * 3
    assert _rounds() == 4
    for _ in range(256 - 70 + 6):
        call()
    assert _rounds() == 5
    torch.ops.slimops.conv2d_routes(True)


def test_far_apart_routes_skip_the_early_windows(monkeypatch):
    """A pass whose routes took far different times back to back (more than 1.5x, route.h
    kRouteFarRatio) runs no window before its 256th call; closer ones from the 2nd. Which
    case a shape falls in is measured, so the test reads which one it got from the first
    measurements completed and checks where the windows ran in that case."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "auto")
    monkeypatch.delenv("SLIMOPS_CONV_ROUTE_EARLY_WINDOWS", raising=False)
    torch.ops.slimops.conv2d_routes(True)
    x, weight = torch.randn(2, 16, 24, 24), torch.randn(32, 32, 3, 3)

    def call():
        with torch.no_grad():
            slimops.ops.conv2d(x, weight, None, 16, 1, 1, 1)

    call()
    runs = [_forward_runs_onednn(call) for _ in range(262)]  # calls 1-262 after the first
    assert _rounds() in (1 + 4, 1 + 1)
    starts = [2, 16, 64, 256] if _rounds() == 1 + 4 else [256]
    windows = [runs[s + i - 1] for s in starts for i in range(6)]
    assert windows == [False, True] * 3 * len(starts)  # the kernels, oneDNN, ...
    torch.ops.slimops.conv2d_routes(True)


def test_auto_does_not_measure_tiny_passes(monkeypatch):
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "auto")
    torch.ops.slimops.conv2d_routes(True)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    slimops.ops.conv2d(x, weight, None, 2, 1, 1, 1).sum().backward()
    assert _routes() == 0


@pytest.mark.parametrize("route,onednn_calls", [("auto", False), ("fixed", True)])
def test_tiny_passes_run_the_kernels_under_auto(route, onednn_calls, monkeypatch):
    """Under auto, a pass below the measuring threshold runs slimops' kernels (oneDNN's
    per-call costs exceed its work); the fixed rule still gives a full-width 3x3 to oneDNN."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", route)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    weight = torch.randn(8, 8, 3, 3, requires_grad=True)
    with torch.profiler.profile() as prof:
        slimops.ops.conv2d(x, weight, None, 8, 1, 1, 1).sum().backward()
    names = {e.name for e in prof.events()}
    assert any("convolution" in n for n in names) == onednn_calls, sorted(names)


def test_fixed_route_never_measures(monkeypatch):
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "fixed")
    torch.ops.slimops.conv2d_routes(True)
    x = torch.randn(2, 16, 24, 24, requires_grad=True)
    weight = torch.randn(32, 32, 3, 3, requires_grad=True)
    slimops.ops.conv2d(x, weight, None, 16, 1, 1, 1).sum().backward()
    assert _routes() == 0


def test_onednn_route_copies_the_prefix_only_where_it_reads_the_weight(monkeypatch):
    """Forward and input gradient at a partial width hand oneDNN a contiguous copy of
    W[:o, :i] (what the reference style copies); the weight gradient reads no weight."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "onednn")
    weight = torch.randn(24, 16, 3, 3, requires_grad=True)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    shapes = conv_weight_shapes(weight.shape, 1, 12, 8)
    out = slimops.ops.conv2d(x, weight, None, 12, 1, 1, 1)
    g = torch.randn_like(out)

    def copies(fn):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        return weight_copies(prof, shapes)

    assert copies(lambda: slimops.ops.conv2d(x, weight, None, 12, 1, 1, 1))
    assert copies(lambda: torch.ops.slimops.conv2d_backward_input(
        g, weight.detach(), list(x.shape), [1, 1], [1, 1], [1, 1], 1))
    assert not copies(lambda: torch.ops.slimops.conv2d_backward_weight(
        g, x.detach(), weight.detach(), [1, 1], [1, 1], [1, 1], 1))


def test_onednn_route_skips_what_it_cannot_run(monkeypatch, tol):
    """float64 stays on the kernels even when oneDNN is forced."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "onednn")
    groups, dtype = 2, torch.float64
    x = torch.randn(2, 8, 9, 9, dtype=dtype)
    weight = torch.randn(24, 8 // groups * 2, 3, 3, dtype=dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = slimops.ops.conv2d(x, weight, None, 12, 1, 1, 1, groups)
    assert "aten::convolution" not in {e.name for e in prof.events()}
    exp = reference.conv2d(x, weight, None, 12, [1, 1], [1, 1], [1, 1], groups, None, None,
                           None, None)
    torch.testing.assert_close(out, exp, **tol(dtype, exp))


def test_bad_route_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "fastest")
    with pytest.raises(RuntimeError, match="SLIMOPS_CONV_ROUTE must be auto, fixed or onednn"):
        slimops.ops.conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), None, 4, 1, 1, 1)
