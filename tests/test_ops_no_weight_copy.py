"""The spec's no-copy guarantee, checked with the profiler: forward and backward of every op
at a non-full width never copy the shared weight, neither whole nor its active prefix.

The conv passes run here on the fixed route (SLIMOPS_CONV_ROUTE=fixed: slimops' kernels at
a partial width). With the default measured route, a conv pass that oneDNN ran faster on this
machine takes oneDNN, which gets a copy of the prefix for the forward and the input gradient
(the reference style's copy; DESIGN.md: a kernel is as fast as the reference "or the op uses
the reference"); tests/test_ops_conv2d_route.py checks that copy and its absence in the
weight gradient.

A copy shows up as an ``aten::copy_`` / ``aten::clone`` / ``aten::contiguous`` /
``aten::_to_copy`` event, or an ``aten::reshape`` that has to copy (it then runs
``aten::clone``), whose input has the full weight's shape or one of the prefix's shapes. The
sanity tests at the bottom show the same check catching the copies the reference makes.

The profiler records the calling thread only (not OpenMP workers), so each profile runs
with ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Sequence, Set, Tuple

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import slimops
from slimops import reference
from slimops.nn import SlimConvBNAct

from helpers import spy_eval_chain

pytestmark = pytest.mark.skipif(
    slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
)

@pytest.fixture(autouse=True)
def _fixed_route(monkeypatch):
    monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "fixed")


COPY_EVENTS = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}
COPYING_CHILDREN = {"aten::clone", "aten::copy_", "aten::_to_copy"}

Shape = Tuple[int, ...]


def conv_weight_shapes(weight_shape: Sequence[int], groups: int, out_channels: int,
                       in_channels: int) -> Set[Shape]:
    """The full weight's shape and every shape its active prefix takes when materialised:
    ``[o, ig, kh, kw]``, per group ``[G, og, ig, kh, kw]`` / ``[og, ig, kh, kw]``, and the GEMM
    operands ``[og, ig*kh*kw]`` (also stacked per group, and for the full weight)."""
    rows, ig_full, kh, kw = weight_shape
    og, ig = out_channels // groups, in_channels // groups
    k = kh * kw
    return {
        tuple(weight_shape), (out_channels, ig, kh, kw), (groups, og, ig, kh, kw),
        (og, ig, kh, kw), (og, ig * k), (groups, og, ig * k), (out_channels, ig * k),
        (rows, ig_full * k), (groups, rows // groups, ig_full, kh, kw),
    }


def linear_weight_shapes(weight_shape: Sequence[int], out_features: int,
                         in_features: int) -> Set[Shape]:
    o_full, i_full = weight_shape
    return {(o_full, i_full), (i_full, o_full), (out_features, in_features),
            (in_features, out_features)}


def weight_copies(prof, shapes: Iterable[Shape]) -> List[str]:
    """Every event of ``prof`` that copies a tensor with one of ``shapes``."""
    shapes = {tuple(s) for s in shapes}
    hits = []
    for evt in prof.events():
        copies = evt.name in COPY_EVENTS or (
            evt.name == "aten::reshape"
            and any(c.name in COPYING_CHILDREN for c in evt.cpu_children)
        )
        if not copies:
            continue
        for s in evt.input_shapes or []:
            if tuple(s) in shapes:
                hits.append(f"{evt.name} of {tuple(s)} (inputs {evt.input_shapes})")
                break
    return hits


def profiled(fn: Callable[[], None]):
    """Run ``fn`` under the CPU profiler (shapes recorded) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    return prof


def event_names(prof) -> Set[str]:
    return {evt.name for evt in prof.events()}


def assert_no_weight_copy(prof, shapes, expected_ops):
    names = event_names(prof)
    missing = set(expected_ops) - names
    assert not missing, f"the profile did not record {missing}: nothing was checked"
    hits = weight_copies(prof, shapes)
    assert not hits, "the shared weight was copied:\n" + "\n".join(hits)


def _fwd_bwd(make_out, leaves):
    def run():
        out = make_out()
        torch.autograd.grad(out, leaves, torch.randn_like(out))
    return run


# --------------------------------------------------------------------------------------
# the ops


@pytest.mark.parametrize("kernel", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("groups", [1, 3], ids=["g1", "g3"])
def test_conv2d(groups, kernel):
    # weight [18, 4, k, k]: G*Og = 18, Ig = 4; active o = 9, ig = 2 (so in = 2 * groups)
    weight = torch.randn(18, 4, kernel, kernel, requires_grad=True)
    bias = torch.randn(18, requires_grad=True)
    o, i = 9, 2 * groups
    x = torch.randn(2, i, 11, 7, requires_grad=True)
    p = kernel // 2
    scale = torch.rand(o, requires_grad=True)
    shift = torch.randn(o, requires_grad=True)
    residual = torch.randn(2, o, 11, 7, requires_grad=True)

    def out():
        return slimops.ops.conv2d(x, weight, bias, o, 1, p, 1, groups, scale, shift, residual,
                                  "relu")

    shapes = conv_weight_shapes(weight.shape, groups, o, i)
    # both gradients: one op (conv2d_backward); one of them: its own op
    prof = profiled(_fwd_bwd(out, [x, weight, bias, scale, shift, residual]))
    assert_no_weight_copy(prof, shapes, ["slimops::conv2d", "slimops::epilogue_backward"]
                          + ["slimops::conv2d_backward"])
    assert_no_weight_copy(profiled(_fwd_bwd(out, [x])), shapes,
                          ["slimops::conv2d_backward_input"])
    assert_no_weight_copy(profiled(_fwd_bwd(out, [weight])), shapes,
                          ["slimops::conv2d_backward_weight"])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("kernel, rows, cin, o", [(3, 18, 4, 9), (1, 600, 512, 512)],
                         ids=["k3", "k1_large"])
def test_conv2d_full_input_width_runs_on_onednn_without_a_copy(kernel, rows, cin, o):
    # Every input channel active (ig == Ig): W[:o] is contiguous and the conv runs on oneDNN
    # (csrc/cpu/conv2d.cpp, use_onednn: every 3x3, pointwise from 14M multiply-adds;
    # at::convolution, whose own backend choice is oneDNN for these shapes with 2+ threads)
    # with that view, never a copy of it.
    weight = torch.randn(rows, cin, kernel, kernel, requires_grad=True)
    p = kernel // 2
    x = torch.randn(1, cin, 8, 8, requires_grad=True)  # k1_large: 512 * 512 * 64 = 16.8M MACs
    shift = torch.randn(o, requires_grad=True)

    def out():
        return slimops.ops.conv2d(x, weight, None, o, 1, p, 1, 1, None, shift, None, "relu")

    with torch.no_grad():
        expected = reference.conv2d(x, weight, None, o, [1, 1], [p, p], [1, 1], 1, None, shift,
                                    None, "relu")
        torch.testing.assert_close(out(), expected, rtol=1e-4, atol=1e-4)
    prof = profiled(_fwd_bwd(out, [x, weight, shift]))
    assert_no_weight_copy(prof, conv_weight_shapes(weight.shape, 1, o, cin),
                          ["slimops::conv2d", "aten::convolution", "slimops::conv2d_backward",
                           "aten::convolution_backward"])
    # A partial input width keeps the GEMM path (oneDNN would need the strided prefix copied).
    x_half = torch.randn(1, cin // 2, 8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        slimops.ops.conv2d(x_half, weight.detach(), None, o, 1, p, 1, 1)
    assert "aten::convolution" not in event_names(prof)


@pytest.mark.parametrize("kernel", [(3, 3), (5, 5)], ids=["k3", "k5"])
def test_depthwise_conv2d(kernel):
    weight = torch.randn(16, 1, *kernel, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    x = torch.randn(2, 10, 11, 7, requires_grad=True)
    scale = torch.rand(10, requires_grad=True)
    residual = torch.randn(2, 10, 6, 4, requires_grad=True)

    def out():
        return slimops.ops.depthwise_conv2d(x, weight, bias, 2, kernel[0] // 2, 1, scale, None,
                                            residual, "relu6")

    prof = profiled(_fwd_bwd(out, [x, weight, bias, scale, residual]))
    kh, kw = kernel
    shapes = {(16, 1, kh, kw), (10, 1, kh, kw), (10, kh * kw), (16, kh * kw), (10, kh, kw),
              (16, kh, kw)}
    assert_no_weight_copy(prof, shapes, ["slimops::depthwise_conv2d",
                                         "slimops::depthwise_conv2d_backward_input",
                                         "slimops::depthwise_conv2d_backward_weight"])


@pytest.mark.parametrize("leading", [(5,), (2, 3)], ids=["2d", "3d"])
def test_linear(leading):
    weight = torch.randn(20, 12, requires_grad=True)
    bias = torch.randn(20, requires_grad=True)
    x = torch.randn(*leading, 7, requires_grad=True)

    prof = profiled(_fwd_bwd(lambda: slimops.ops.linear(x, weight, bias, 9), [x, weight, bias]))
    assert_no_weight_copy(prof, linear_weight_shapes(weight.shape, 9, 7),
                          ["slimops::linear", "slimops::linear_backward_input",
                           "slimops::linear_backward_weight"])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("groups", [1, 4], ids=["g1", "g4"])
def test_slim_conv_bn_act(groups, training):
    """The fused block at width 0.5, through autograd's accumulation into .grad as well."""
    block = SlimConvBNAct([8, 16], [8, 16], 3, groups=groups, widths=(0.5, 1.0))
    block.train(training)
    slimops.set_width(block, 0.5)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    residual = torch.randn(2, 8, 9, 7, requires_grad=True)

    def run():
        for _ in range(2):  # the second backward accumulates into existing .grad buffers
            block(x, residual).square().sum().backward()

    prof = profiled(run)
    expected = ["slimops::conv2d", "slimops::conv2d_backward"]
    if training:
        expected += ["slimops::batch_norm_act", "slimops::batch_norm_act_backward"]
    assert_no_weight_copy(prof, conv_weight_shapes(block.conv.weight.shape, groups, 8, 8),
                          expected)
    assert block.conv.weight.grad is not None


def test_eval_chain(monkeypatch):
    """A block's layers run as one chained C call in inference (``slimops.nn.EvalChain``)
    at width 0.5: the same ops on the shared weights' prefixes, no copy."""

    class Block(torch.nn.Module):
        chain = slimops.nn.EvalChain([("a", 0, None), ("b", 1, 0)])

        def __init__(self):
            super().__init__()
            self.a = SlimConvBNAct([8, 16], [8, 16], 3, widths=(0.5, 1.0))
            self.b = SlimConvBNAct([8, 16], [8, 16], 1, widths=(0.5, 1.0))

        def forward(self, x):
            out = self.chain(self, x)
            return self.b(self.a(x), x) if out is None else out

    block = Block().eval()
    slimops.set_width(block, 0.5)
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        block(x)  # builds the plans (module calls); the profiled call is the chain's
    answered = spy_eval_chain(monkeypatch)

    def run():
        with torch.no_grad():
            block(x)

    prof = profiled(run)
    assert answered == [True]
    shapes = conv_weight_shapes(block.a.conv.weight.shape, 1, 8, 8)
    shapes |= conv_weight_shapes(block.b.conv.weight.shape, 1, 8, 8)
    assert_no_weight_copy(prof, shapes, ["slimops::conv2d"])


@pytest.mark.parametrize("groups", [1, 4], ids=["g1", "g4"])
def test_slim_conv_bn_act_fused_training_statistics(groups, monkeypatch):
    """Training through ``conv2d_bn_act_train`` (the GPU's path, taken on the CPU here)."""
    from slimops.ops import conv2d_bn_act

    monkeypatch.setattr(conv2d_bn_act, "fused_train_available", lambda x, w=None: True)
    block = SlimConvBNAct([8, 16], [8, 16], 3, groups=groups, widths=(0.5, 1.0)).train()
    slimops.set_width(block, 0.5)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)

    def run():
        for _ in range(2):
            block(x).square().sum().backward()

    prof = profiled(run)
    assert_no_weight_copy(prof, conv_weight_shapes(block.conv.weight.shape, groups, 8, 8),
                          ["slimops::conv2d_bn_act_train", "slimops::conv2d",
                           "slimops::conv2d_backward_weight",
                           "slimops::batch_norm_act_backward"])


def test_depthwise_slim_conv_bn_act():
    block = SlimConvBNAct([8, 16], [8, 16], 3, groups=16, widths=(0.5, 1.0))
    block.eval()
    slimops.set_width(block, 0.5)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    prof = profiled(lambda: block(x).sum().backward())
    assert block.conv.weight.shape == (16, 1, 3, 3)
    assert_no_weight_copy(prof, {(16, 1, 3, 3), (8, 1, 3, 3), (8, 9), (16, 9)},
                          ["slimops::depthwise_conv2d",
                           "slimops::depthwise_conv2d_backward_weight"])


def test_depthwise_slim_conv_bn_act_fused_training_statistics(monkeypatch):
    from slimops.ops import conv2d_bn_act

    monkeypatch.setattr(conv2d_bn_act, "fused_train_available", lambda x, w=None: True)
    block = SlimConvBNAct([8, 16], [8, 16], 3, groups=16, widths=(0.5, 1.0)).train()
    slimops.set_width(block, 0.5)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    prof = profiled(lambda: block(x).sum().backward())
    assert_no_weight_copy(prof, {(16, 1, 3, 3), (8, 1, 3, 3), (8, 9), (16, 9)},
                          ["slimops::depthwise_conv2d_bn_act_train",
                           "slimops::depthwise_conv2d",
                           "slimops::depthwise_conv2d_backward_weight"])


# --------------------------------------------------------------------------------------
# the check can fail


def test_detects_reference_grouped_copy():
    """The reference gathers the per-group prefixes of a grouped weight with a reshape that
    copies: the same check must flag it."""
    weight = torch.randn(18, 4, 3, 3, requires_grad=True)
    x = torch.randn(2, 6, 11, 7, requires_grad=True)
    prof = profiled(_fwd_bwd(lambda: reference.conv2d(x, weight, None, 9, 1, 1, 1, 3),
                             [x, weight]))
    hits = weight_copies(prof, conv_weight_shapes(weight.shape, 3, 9, 6))
    assert hits, "the reference's reshape copy was not detected"
    assert any("(3, 3, 2, 3, 3)" in h for h in hits)


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_detects_explicit_contiguous(kind):
    """``weight[:o, :i].contiguous()`` before a stock op is exactly the copy slimops avoids."""
    if kind == "conv2d":
        weight = torch.randn(16, 12, 3, 3, requires_grad=True)
        x = torch.randn(2, 6, 11, 7, requires_grad=True)
        run = _fwd_bwd(lambda: torch.nn.functional.conv2d(x, weight[:10, :6].contiguous(),
                                                          padding=1), [x, weight])
        shapes = conv_weight_shapes(weight.shape, 1, 10, 6)
    else:
        weight = torch.randn(20, 12, requires_grad=True)
        x = torch.randn(5, 7, requires_grad=True)
        run = _fwd_bwd(lambda: x @ weight[:9, :7].contiguous().t(), [x, weight])
        shapes = linear_weight_shapes(weight.shape, 9, 7)
    hits = weight_copies(profiled(run), shapes)
    assert hits and any("contiguous" in h or "clone" in h for h in hits), hits


def test_detects_full_weight_copy():
    weight = torch.randn(16, 12, 3, 3)
    prof = profiled(lambda: weight.clone())
    assert weight_copies(prof, conv_weight_shapes(weight.shape, 1, 10, 6))
    prof = profiled(lambda: weight.to(torch.float64))
    assert weight_copies(prof, conv_weight_shapes(weight.shape, 1, 10, 6))


def test_non_copying_reshape_is_not_flagged():
    """A reshape that is only a view must not count (or the check would be unusable)."""
    weight = torch.randn(16, 12, 3, 3)
    prof = profiled(lambda: weight.reshape(16, 108))
    assert "aten::reshape" in event_names(prof)
    assert not weight_copies(prof, conv_weight_shapes(weight.shape, 1, 10, 6))


def test_threads_restored():
    before = torch.get_num_threads()
    profiled(lambda: None)
    assert torch.get_num_threads() == before
