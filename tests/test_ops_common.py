"""Every argument error of the public ops names the op (slimops/ops/_common.py): three
messages did not ("input of spatial size 1x1 is too small ...", "unknown activation ...",
"need stride >= 1 ..."), so a user with several ops in a model could not tell which failed."""
from __future__ import annotations

import pytest
import torch

from slimops import ops

X = torch.randn(2, 4, 8, 8)
W = torch.randn(6, 4, 3, 3)
DW = torch.randn(4, 1, 3, 3)

BAD_CALLS = {
    "conv2d too small": (lambda: ops.conv2d(torch.randn(1, 4, 1, 1), W, None, 6),
                         "slimops.conv2d: input of spatial size 1x1 is too small"),
    "conv2d activation": (lambda: ops.conv2d(X, W, None, 6, activation="gelu"),
                          "slimops.conv2d: unknown activation 'gelu'"),
    "conv2d stride": (lambda: ops.conv2d(X, W, None, 6, stride=0),
                      "slimops.conv2d: need stride >= 1"),
    "conv2d padding": (lambda: ops.conv2d(X, W, None, 6, padding=-1),
                       "slimops.conv2d: need stride >= 1, dilation >= 1, padding >= 0"),
    "conv2d stride type": (lambda: ops.conv2d(X, W, None, 6, stride=1.5),
                           "slimops.conv2d: stride must be an int"),
    "depthwise too small": (lambda: ops.depthwise_conv2d(torch.randn(1, 4, 2, 2), DW),
                            "slimops.depthwise_conv2d: input of spatial size 2x2"),
    "depthwise activation": (lambda: ops.depthwise_conv2d(X, DW, activation="tanh"),
                             "slimops.depthwise_conv2d: unknown activation 'tanh'"),
    "depthwise dilation": (lambda: ops.depthwise_conv2d(X, DW, dilation=0),
                           "slimops.depthwise_conv2d: need stride >= 1"),
    "batch_norm_act activation": (
        lambda: ops.batch_norm_act(X, None, None, None, None, True, activation="elu"),
        "slimops.batch_norm_act: unknown activation 'elu'"),
}


@pytest.mark.parametrize("call,message", BAD_CALLS.values(), ids=list(BAD_CALLS))
def test_argument_errors_name_the_op(call, message):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


# --------------------------------------------------------------------------------------
# The autograd kernels (csrc/autograd) skip building a graph when there is nothing to record
# (graph_needed): no grad mode, or no argument requiring grad. Same results either way.

GRAPH_CALLS = {
    "conv2d": lambda x, w, b: ops.conv2d(x, w, b, 6, padding=1, activation="relu"),
    "depthwise_conv2d": lambda x, w, b: ops.depthwise_conv2d(x, w[:, :1].contiguous(), b,
                                                             padding=1),
    "linear": lambda x, w, b: ops.linear(x.flatten(1)[:, :36], w.flatten(1), b),
    "batch_norm_act": lambda x, w, b: ops.batch_norm_act(x, w[:4, 0, 0, 0], b[:4], None, None,
                                                         True, activation="relu"),
}


@pytest.mark.parametrize("name", list(GRAPH_CALLS))
def test_autograd_kernels_record_only_when_needed(name):
    call = GRAPH_CALLS[name]
    x, w, b = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.randn(6)
    with torch.no_grad():
        plain = call(x, w, b)
    assert plain.grad_fn is None
    frozen = call(x, w, b)  # grad mode on, nothing requires grad
    assert frozen.grad_fn is None and not frozen.requires_grad
    x.requires_grad_()
    recorded = call(x, w, b)
    assert recorded.grad_fn is not None
    torch.testing.assert_close(plain, recorded.detach(), rtol=0, atol=0)
    torch.testing.assert_close(frozen, plain, rtol=0, atol=0)
    (gx,) = torch.autograd.grad(recorded.sum(), x)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
