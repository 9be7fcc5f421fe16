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
