"""The ops' backward nodes (csrc/autograd/): typed torch::autograd::Node subclasses, as
ATen's generated nodes are. What autograd promises for any op holds for them: the graph's
shape and names, gradients of a subset of the inputs, the saved tensors freed after a
backward (a second one fails unless retain_graph), saved inputs modified in place caught,
forward-mode AD refused with a clear error, and compiled autograd tracing them."""

from __future__ import annotations

import pytest
import torch

import slimops
from slimops import reference

pytestmark = pytest.mark.skipif(slimops.backend_info()["cpu"] != "C++",
                                reason="needs the compiled extension slimops._C")


def _conv(x, w, b, scale, shift, residual, impl=slimops.ops):
    return impl.conv2d(x, w, b, 6, 1, 1, 1, 1, scale, shift, residual, "relu")


def _depthwise(x, w, b, scale, shift, residual, impl=slimops.ops):
    return impl.depthwise_conv2d(x, w, b, 1, 1, 1, scale, shift, residual, "relu6")


def _linear(x, w, b, impl=slimops.ops):
    return impl.linear(x, w, b, 6)


def _bn(x, w, b, residual, impl=slimops.ops):
    return impl.batch_norm_act(x, w, b, None, None, True, 0.1, 1e-5, residual, "relu")


def _cases():
    """name -> (op, leaves): every tensor argument present and requiring grad."""
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64).requires_grad_()
    return {
        "conv2d": (_conv, [leaf(2, 4, 5, 5), leaf(8, 6, 3, 3), leaf(8), leaf(6), leaf(6),
                           leaf(2, 6, 5, 5)]),
        "depthwise_conv2d": (_depthwise, [leaf(2, 4, 5, 5), leaf(7, 1, 3, 3), leaf(7), leaf(4),
                                          leaf(4), leaf(2, 4, 5, 5)]),
        "linear": (_linear, [leaf(3, 5), leaf(8, 7), leaf(8)]),
        "batch_norm_act": (_bn, [leaf(4, 6, 3, 3), leaf(6), leaf(6), leaf(4, 6, 3, 3)]),
    }


CASES = list(_cases())
NODE_NAMES = {"conv2d": "Conv2dBackward", "depthwise_conv2d": "DepthwiseConv2dBackward",
              "linear": "LinearBackward", "batch_norm_act": "BatchNormActBackward"}


@pytest.mark.parametrize("name", CASES)
def test_node_records_the_graph(name):
    op, leaves = _cases()[name]
    out = op(*leaves)
    assert out.requires_grad and out.grad_fn.name() == f"slimops::{NODE_NAMES[name]}"
    # one edge per tensor argument, in schema order, each to its leaf's accumulator
    edges = [fn for fn, _ in out.grad_fn.next_functions]
    assert len(edges) >= len(leaves)
    assert [e.variable for e in edges[:1]] == [leaves[0]]
    if name == "batch_norm_act":
        raw = torch.ops.slimops.batch_norm_act(*leaves[:3], None, None, True, 1e-5, leaves[3],
                                               1)
        assert raw[0].requires_grad and not raw[1].requires_grad and not raw[2].requires_grad


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("which", [0, 1, -1], ids=["first", "second", "last"])
def test_gradient_of_one_input_matches_reference(name, which):
    """torch.autograd.grad(inputs=[one]) asks the node for one gradient only."""
    op, leaves = _cases()[name]
    target = leaves[which]
    out = op(*leaves)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, [target], g)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    exp = torch.autograd.grad(op(*ref_leaves, impl=reference), [ref_leaves[which]], g)[0]
    torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("name", CASES)
def test_second_backward_needs_retain_graph(name):
    op, leaves = _cases()[name]
    out = op(*leaves).sum()
    out.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    out.backward()
    for t, g in zip(leaves, first):
        torch.testing.assert_close(t.grad, 2 * g)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward()


@pytest.mark.parametrize("name", CASES)
def test_saved_input_modified_in_place_is_caught(name):
    op, leaves = _cases()[name]
    x = leaves[0].detach().clone().requires_grad_()
    y = x * 1  # a non-leaf, so it can be modified in place
    out = op(y, *leaves[1:])
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("name", CASES)
def test_frozen_arguments_get_no_gradient(name):
    op, leaves = _cases()[name]
    frozen = [leaves[0]] + [t.detach() for t in leaves[1:]]
    op(*frozen).sum().backward()
    assert leaves[0].grad is not None
    assert all(t.grad is None for t in frozen[1:])


def test_forward_mode_ad_is_refused():
    import torch.autograd.forward_ad as fwAD
    op, leaves = _cases()["conv2d"]
    with fwAD.dual_level():
        dual = fwAD.make_dual(leaves[0].detach(), torch.randn_like(leaves[0]))
        with pytest.raises(RuntimeError, match="forward-mode AD is not supported"):
            op(dual, *leaves[1:])


def test_no_grad_records_nothing():
    op, leaves = _cases()["depthwise_conv2d"]
    with torch.no_grad():
        out = op(*leaves)
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("name", CASES)
def test_compiled_autograd_traces_the_nodes(name):
    """Under torch._dynamo's compiled autograd each node's backward is traced (its saved
    tensors swapped for the trace's) and gives the eager backward's gradients."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    op, leaves = _cases()[name]
    g = torch.randn_like(op(*leaves))
    eager = torch.autograd.grad(op(*leaves), leaves, g)
    torch._dynamo.reset()
    counters.clear()
    try:
        with compiled_autograd._enable(torch.compile(backend="eager")):
            out = op(*leaves)
            out.backward(g)
    finally:
        torch._dynamo.reset()
    assert counters["compiled_autograd"]["captures"] == 1
    for t, e in zip(leaves, eager):
        torch.testing.assert_close(t.grad, e)
