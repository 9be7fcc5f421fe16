"""Switchable BN in training with the statistics reduced in the conv's epilogue: the Triton
conv writes per-tile partial sums (``conv2d_with_stats``), the BN kernels finalise them and
normalise (``batch_norm_act_from_partials``), and together they equal the reference's
``conv2d`` followed by training-mode ``batch_norm_act`` on the width's prefix of the
shared weights and of the width's own γ/β. Runs under ``TRITON_INTERPRET=1`` without a GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from slimops import reference  # noqa: E402
from slimops.kernels import batch_norm_act as bn_kernels  # noqa: E402
from slimops.kernels import conv2d as conv_kernels  # noqa: E402

ACT = {None: 0, "relu": 1, "relu6": 2}


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    "cin,cout,k,stride,groups",
    [(3, 5, 3, 1, 1), (7, 13, 1, 1, 1), (6, 4, 3, 2, 2)],
)
def test_conv_stats_epilogue_then_bn_equals_reference(cin, cout, k, stride, groups, residual,
                                                       activation):
    full_in, full_out = 2 * cin, 2 * cout  # the shared weight is wider: a true prefix
    torch.manual_seed(0)
    weight = torch.randn(full_out, full_in // groups, k, k)
    bias = torch.randn(full_out)
    gamma, beta = torch.rand(cout) + 0.5, torch.randn(cout)
    x = torch.randn(2, cin, 9, 7)
    p = k // 2

    z, psum, psumsq = conv_kernels.conv2d_with_stats(
        x, weight, bias, cout, [stride, stride], [p, p], [1, 1], groups)
    count = z.numel() // cout
    res = torch.randn_like(z) if residual else None
    out, mean, var = bn_kernels.batch_norm_act_from_partials(
        z, psum, psumsq, count, gamma, beta, 1e-5, res, ACT[activation])

    z_ref = reference.conv2d(x, weight, bias, cout, stride, p, 1, groups)
    out_ref = reference.batch_norm_act(z_ref, gamma, beta, None, None, True, eps=1e-5,
                                       residual=res, activation=activation)
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, z_ref.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, z_ref.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
