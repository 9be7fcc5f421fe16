"""The masked-row forward (csrc/cpu/depthwise_rows.inc, rows_plane) behind
slimops::depthwise_conv2d: float32 3x3 at column stride 1 or 2, any padding and dilation, from 7
output columns up (not 32 at stride 1; AVX2 at stride 1: to 28 and from 56), each plane's rows in
masked vectors with the epilogue in registers. Under AVX2 with finite weights the padding lanes
are masked-off zeros in a plain multiply-add; with an Inf or NaN weight they are blended out.
The same switch covers the row kernels of the gradients: the stride-1 input gradient (rows_plane
on the transposed geometry) and the weight gradient (rows_weight_grad, stride 1 or 2), whose
padding taps and lanes past the output are left out as torch leaves them out.

Every case runs the op with SLIMOPS_DEPTHWISE_ROWS=1 and =0 (the lanes and per-plane paths; the
switch is read on every call), forward and every gradient, each against the reference.
test_rows_path_is_taken shows that the switch does change the path. test_cpu_isa.py runs this
file again under the AVX2 and baseline caps (under the baseline there is no row kernel and both
runs take the other paths)."""
from __future__ import annotations

import pytest
import torch

import slimops
from slimops import reference

from helpers import check_op_switch

pytestmark = pytest.mark.skipif(
    slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
)

ISA = slimops.backend_info().get("cpu_isa", "base")
SWITCH = "SLIMOPS_DEPTHWISE_ROWS"
GRAD_SWITCH = "SLIMOPS_DEPTHWISE_ROWS_GRAD"

# (active channels, weight rows, H, W, stride, padding, dilation, batch). Output widths 7 to
# 64 (both sides of whole vectors of 8 and 16 columns and of AVX2's stride-1 gap from 29 to
# 55 columns, and 32 at stride 1, which takes the other paths), odd sides, padding 0 to 2,
# dilation 2, a residual-sized batch, and planes of one and two rows.
CASES = {
    "7x7_s1": (20, 24, 7, 7, 1, 1, 1, 1),
    "14x14_s1": (33, 40, 14, 14, 1, 1, 1, 1),
    "14x14_s2": (17, 17, 14, 14, 2, 1, 1, 2),
    "odd_9x23_s1": (5, 8, 9, 23, 1, 1, 1, 3),
    "odd_13x35_s2": (6, 6, 13, 35, 2, 1, 1, 1),
    "8_cols": (4, 4, 5, 8, 1, 1, 1, 1),
    "9_cols": (4, 4, 5, 9, 1, 1, 1, 1),
    "16_cols_s2": (4, 4, 5, 31, 2, 1, 1, 1),
    "17_cols_s2": (4, 4, 5, 33, 2, 1, 1, 1),
    "33_cols_s2": (3, 5, 6, 66, 2, 1, 1, 1),
    "no_padding": (7, 7, 11, 12, 1, 0, 1, 1),
    "padding_2": (7, 9, 10, 10, 1, 2, 1, 2),
    "padding_2_s2": (7, 9, 21, 19, 2, 2, 1, 1),
    "dilation_2": (5, 5, 12, 15, 1, 2, 2, 1),
    "dilation_2_s2": (5, 5, 17, 30, 2, 2, 2, 1),
    "28_cols": (4, 4, 9, 28, 1, 1, 1, 1),
    "32_cols": (4, 4, 9, 32, 1, 1, 1, 1),
    "40_cols": (4, 4, 6, 40, 1, 1, 1, 1),
    "56x56_s1": (3, 4, 56, 56, 1, 1, 1, 1),
    "64_cols": (3, 3, 7, 64, 1, 1, 1, 2),
    "one_row": (8, 8, 1, 20, 1, 1, 1, 1),
    "two_rows_s2": (8, 8, 2, 29, 2, 1, 1, 2),
    "16384_cols": (2, 2, 3, 16384, 1, 1, 1, 1),  # the widest rows it takes (AVX-512)
    "16385_cols": (2, 2, 3, 16385, 1, 1, 1, 1),  # past its cap: the other paths
}


def _kwargs(case, epilogue=False, act=None):
    c, c_full, h, w, s, p, d, n = CASES[case]
    x = torch.randn(n, c, h, w)
    kwargs = dict(input=x, weight=torch.randn(c_full, 1, 3, 3), bias=None, stride=s,
                  padding=p, dilation=d)
    if epilogue:
        out = reference.depthwise_conv2d(x, kwargs["weight"], None, s, p, d)
        kwargs.update(bias=torch.randn(c_full), scale=torch.rand(c) + 0.5,
                      shift=torch.randn(c), residual=torch.randn_like(out), activation=act)
    return kwargs


def check_both_paths(kwargs, monkeypatch, tol):
    """The op with the switch on and off, forward and every gradient, against the reference."""
    check_op_switch(slimops.ops.depthwise_conv2d, reference.depthwise_conv2d, kwargs,
                    monkeypatch, tol, SWITCH)


@pytest.mark.parametrize("threads", ["one_thread", "all_threads"])
@pytest.mark.parametrize("case", list(CASES))
def test_rows_match_reference(case, threads, request, monkeypatch, tol):
    request.getfixturevalue(threads)
    check_both_paths(_kwargs(case), monkeypatch, tol)


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("case", ["14x14_s1", "odd_13x35_s2", "padding_2"])
def test_rows_epilogue(case, act, all_threads, monkeypatch, tol):
    check_both_paths(_kwargs(case, epilogue=True, act=act), monkeypatch, tol)


def _inf_weight_at_border():
    x, weight = torch.randn(2, 20, 8, 8), torch.randn(24, 1, 3, 3)
    weight[3, 0, 0, 0] = float("inf")  # its tap reads the padding along the top and left
    return x, weight


@pytest.mark.skipif(ISA == "base", reason="no row kernel under the baseline cap")
def test_rows_path_is_taken(monkeypatch):
    """An Inf weight whose tap falls in the padding: torch's convolution skips the tap there,
    so the border stays finite; the other paths multiply their zero-padded field by it and
    give NaN (test_ops_depthwise_conv2d.py's known xfail). The row kernel leaves such lanes
    out of the multiply-add: no NaN with the switch on, NaN with it off."""
    x, weight = _inf_weight_at_border()
    nans = {}
    for on in ("1", "0"):
        monkeypatch.setenv(SWITCH, on)
        with torch.inference_mode():
            nans[on] = slimops.ops.depthwise_conv2d(x, weight, None, 1, 1).isnan().any().item()
    assert nans == {"1": False, "0": True}


@pytest.mark.skipif(ISA == "base", reason="no row kernel under the baseline cap")
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("stride,w", [(1, 8), (1, 20), (2, 15), (2, 45)])
def test_rows_propagate_non_finite_values_as_torch(value, stride, w, monkeypatch):
    """A NaN or Inf in the input (at a corner, in the middle, at both ends of a row, where an
    edge vector's load of the neighbouring row would pick it up unmasked) or in a weight
    reaches the same outputs as in the reference, padding taps included (the forward; the
    gradients run on the other kernels). Widths in the row kernel's range under both ISAs at
    both strides, one vector of columns and several."""
    monkeypatch.setenv(SWITCH, "1")
    x, weight = torch.randn(2, 20, 15, w), torch.randn(24, 1, 3, 3)
    x[0, 3, 0, 0] = value
    x[1, 7, 7, w // 2] = value
    x[1, 9, 14, w - 1] = value
    x[0, 4, 6, 0] = value
    x[0, 4, 9, w - 1] = value
    weight[5, 0, 2, 2] = value
    weight[11, 0, 0, 1] = value
    weight[22, 0, 1, 1] = value  # row 22 >= the input's 20 channels: unused
    got = slimops.ops.depthwise_conv2d(x, weight, None, stride, 1)
    exp = reference.depthwise_conv2d(x, weight, None, stride, 1)
    assert torch.equal(got.isnan(), exp.isnan())
    assert torch.equal(got.isposinf(), exp.isposinf())
    assert torch.equal(got.isneginf(), exp.isneginf())
    finite = exp.isfinite()
    torch.testing.assert_close(got[finite], exp[finite])


def _gradients(op, x, weight, g, stride):
    """(grad_input, grad_weight) of op(x, weight) at stride `stride`, padding 1, for g."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    return torch.autograd.grad(op(x, weight, None, stride, 1), (x, weight), g)


@pytest.mark.skipif(ISA == "base", reason="no row kernel under the baseline cap")
@pytest.mark.parametrize("switch", [SWITCH, GRAD_SWITCH])
@pytest.mark.parametrize("stride", [1, 2])
def test_rows_weight_grad_path_is_taken(stride, switch, monkeypatch):
    """An Inf output gradient at the top-left corner: torch's weight gradient skips the taps
    that read the padding there (they stay finite), the lanes and per-plane paths multiply
    their zero-padded field by it (NaN). The row kernel gives torch's; the other paths' NaN
    with either switch off shows it changes the path (SLIMOPS_DEPTHWISE_ROWS_GRAD: the
    gradients' row kernels alone, the forward's stays). 48 output columns at batch 2:
    whole vectors under both ISAs, the row kernel's range (depthwise_rows_grad_suit)."""
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "fixed")
    x, weight = torch.randn(2, 20, 9, 48 * stride), torch.randn(24, 1, 3, 3)
    out = reference.depthwise_conv2d(x, weight, None, stride, 1)
    g = torch.randn_like(out)
    g[0, 3, 0, 0] = float("inf")
    exp = _gradients(reference.depthwise_conv2d, x, weight, g, stride)[1]
    nans = {}
    for on in ("1", "0"):
        monkeypatch.setenv(switch, on)
        got = _gradients(slimops.ops.depthwise_conv2d, x, weight, g, stride)[1]
        nans[on] = got[3].isnan().any().item()
        if on == "1":
            assert torch.equal(got.isnan(), exp.isnan())
            assert torch.equal(got.isinf(), exp.isinf())
    assert nans == {"1": False, "0": True}


@pytest.mark.skipif(ISA == "base", reason="no row kernel under the baseline cap")
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("stride,w", [(1, 8), (1, 24), (1, 56), (2, 15), (2, 45)])
def test_rows_gradients_propagate_non_finite_values_as_torch(value, stride, w, monkeypatch):
    """A NaN or Inf in the input, the output gradient (at corners, in the middle, at both
    ends of a row) or a weight reaches the same weight and input gradients as in the
    reference, padding taps and the columns past the output's last vector included (the
    input gradient adds no term of an Inf weight where torch's adds none: stride 1 on the
    masked-row forward, stride 2 on input_grad_s2_plane). Output widths in the row kernels'
    range under both ISAs (8, 24, 56 at stride 1; 8, 23 at stride 2), one vector and several."""
    monkeypatch.setenv(SWITCH, "1")
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "fixed")
    x, weight = torch.randn(2, 20, 15, w), torch.randn(24, 1, 3, 3)
    x[0, 3, 0, 0] = value
    x[1, 7, 7, w // 2] = value
    x[1, 9, 14, w - 1] = value
    weight[5, 0, 2, 2] = value
    weight[13, 0, 0, 1] = value
    out = reference.depthwise_conv2d(x, weight, None, stride, 1)
    g = torch.randn_like(out)
    oh, ow = out.shape[-2:]
    g[0, 4, 0, ow - 1] = value
    g[1, 11, oh - 1, 0] = value
    g[0, 12, oh // 2, ow // 2] = value
    grads = [_gradients(op, x, weight, g, stride)
             for op in (slimops.ops.depthwise_conv2d, reference.depthwise_conv2d)]
    for got, exp in zip(*grads):
        assert torch.equal(got.isnan(), exp.isnan())
        assert torch.equal(got.isposinf(), exp.isposinf())
        assert torch.equal(got.isneginf(), exp.isneginf())
        finite = exp.isfinite()
        torch.testing.assert_close(got[finite], exp[finite], rtol=1e-4, atol=1e-3)


def test_rows_read_the_weight_prefix_in_place(monkeypatch):
    """No copy of the weight (or anything else) runs inside the op on the row path."""
    monkeypatch.setenv(SWITCH, "1")
    x, weight = torch.randn(1, 40, 14, 14), torch.randn(64, 1, 3, 3)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        slimops.ops.depthwise_conv2d(x, weight, None, 1, 1)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::copy_", "aten::contiguous", "aten::clone"}, names
