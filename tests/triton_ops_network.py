"""The small network the triton_op tests run: shared by tests/test_ops_triton_ops.py (eager,
under the interpreter) and tests/trace_triton_ops.py (traced, in a process of its own)."""

from __future__ import annotations

from slimops.ops.batch_norm_act import batch_norm_act
from slimops.ops.conv2d import conv2d
from slimops.ops.depthwise_conv2d import depthwise_conv2d
from slimops.ops.linear import linear


def network(x, w1, b1, w2, gamma, beta, w3, b3, running_mean, running_var, training):
    """A slimmable grouped conv (a 12-channel prefix of 16 rows, relu), a depthwise conv
    (relu6), a batch norm (relu; batch statistics when ``training``) and a linear layer (7
    of 10 outputs), each on a prefix of its shared weight."""
    z = conv2d(x, w1, b1, out_channels=12, stride=2, padding=1, groups=2, activation="relu")
    z = depthwise_conv2d(z, w2, None, padding=1, activation="relu6")
    z = batch_norm_act(z, gamma, beta, running_mean, running_var, training,
                       activation="relu")
    return linear(z.mean((2, 3)), w3, b3, out_features=7)
