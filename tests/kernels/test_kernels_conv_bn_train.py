"""Switchable BN in training with the statistics reduced in the conv's epilogue: the Triton
conv writes per-tile moments (``conv2d_with_stats``), the BN kernels merge them and
normalise (``batch_norm_act_from_partials``), and together they equal the reference's
``conv2d`` followed by training-mode ``batch_norm_act`` on the width's prefix of the
shared weights and of the width's own γ/β; in fp16 the statistics are fp32 and accurate at
|mean| / std = 100. Runs under ``TRITON_INTERPRET=1`` without a GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from slimops import reference  # noqa: E402
from slimops.kernels import batch_norm_act as bn_kernels  # noqa: E402
from slimops.kernels import conv2d as conv_kernels  # noqa: E402
from slimops.kernels import depthwise_conv2d as dw_kernels  # noqa: E402
from slimops.ops import _backend  # noqa: E402

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

    z, moments = conv_kernels.conv2d_with_stats(
        x, weight, bias, cout, [stride, stride], [p, p], [1, 1], groups)
    count = z.numel() // cout
    res = torch.randn_like(z) if residual else None
    out, mean, var = bn_kernels.batch_norm_act_from_partials(
        z, moments, count, gamma, beta, 1e-5, res, ACT[activation])

    z_ref = reference.conv2d(x, weight, bias, cout, stride, p, 1, groups)
    out_ref = reference.batch_norm_act(z_ref, gamma, beta, None, None, True, eps=1e-5,
                                       residual=res, activation=activation)
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, z_ref.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, z_ref.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)


def _identity_with_offset(c: int, offset: float):
    """A depthwise 1x1 weight of ones and a bias ``offset``: ``z = x + offset``, rounded to
    the input's dtype as stored, so the test controls |mean| / std."""
    return torch.ones(c, 1, 1, 1, dtype=torch.float16), torch.full((c,), offset,
                                                                    dtype=torch.float16)


@pytest.mark.parametrize("path", ["depthwise", "conv"])
def test_fp16_statistics_at_mean_over_std_100(path):
    """Issue 17: a fp16 conv output with |mean| / std = 100, statistics from the conv's
    epilogue (``store_tile_moments``), merged by the tree: fp32 mean/var, the variance within
    1e-5 (relative) of float64's over the same stored fp16 values."""
    torch.manual_seed(0)
    c = 3
    x = (torch.randn(4, c, 30, 30) * 8.0).to(torch.float16)
    w, b = _identity_with_offset(c, 800.0)
    if path == "depthwise":
        z, moments = dw_kernels.depthwise_conv2d_with_stats(x, w, b, [1, 1], [0, 0], [1, 1])
    else:  # a grouped 1x1 conv with groups = c is the same identity map, on the GEMM path
        z, moments = conv_kernels.conv2d_with_stats(x, w, b, c, [1, 1], [0, 0], [1, 1], c)
    zd = z.double()
    want_mean, want_var = zd.mean((0, 2, 3)), zd.var((0, 2, 3), unbiased=False)
    assert float((want_mean.abs() / want_var.sqrt()).min()) > 90
    assert moments.shape[1] > 1  # several tiles were merged
    out, mean, var = bn_kernels.batch_norm_act_from_partials(z, moments, z.numel() // c, None,
                                                             None, 1e-5, None, 0)
    assert out.dtype == torch.float16
    assert mean.dtype == var.dtype == torch.float32
    assert float(((var.double() - want_var) / want_var).abs().max()) < 1e-5
    assert float(((mean.double() - want_mean) / want_mean).abs().max()) < 1e-6


def test_fp32_saved_statistics_reach_the_backward():
    """The fused ops save fp32 statistics for fp16 inputs; the Triton backward reads them
    (no rounding of the variance to fp16 before 1/std) and gives what it gives with the
    statistics cast to fp16 when those are exact in fp16."""
    torch.manual_seed(1)
    z = (torch.randn(2, 4, 9, 9) * 2 + 1).to(torch.float16)
    mean = torch.tensor([0.5, 1.0, 1.5, -2.0])  # exact in fp16
    var = torch.tensor([4.0, 2.0, 0.25, 1.0])
    out = torch.randn_like(z)
    go = torch.randn_like(z)
    w = torch.rand(4).to(torch.float16) + 0.5
    a = bn_kernels.batch_norm_act_backward(go, z, out, w, mean, var, 1e-5, True, 0)
    b = bn_kernels.batch_norm_act_backward(go, z, out, w, mean.half(), var.half(), 1e-5, True,
                                           0)
    for u, v in zip(a, b):
        assert u.dtype == torch.float16
        assert torch.equal(u, v)


@pytest.mark.skipif(not _backend.HAS_C, reason="the fused op needs the compiled extension")
def test_fused_op_fake_and_triton_statistics_dtype():
    """The fused op's statistics dtype: its Triton implementation returns fp32 mean/var for
    an fp16 input, and its fake promises the same (``stats_dtype``), fp64 for fp64."""
    from slimops.ops import conv2d_bn_act as fused

    assert fused.stats_dtype(torch.float16) == torch.float32
    assert fused.stats_dtype(torch.bfloat16) == torch.float32
    assert fused.stats_dtype(torch.float32) == torch.float32
    assert fused.stats_dtype(torch.float64) == torch.float64
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8).to(torch.float16)
    w = torch.randn(4, 3, 3, 3).to(torch.float16)
    gamma, beta = torch.ones(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16)
    args = (x, w, None, 4, [1, 1], [1, 1], [1, 1], 1, gamma, beta, 1e-5, None, 2)
    out, z, mean, var = fused._triton(*args)
    assert out.dtype == z.dtype == torch.float16
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(var, z.float().var((0, 2, 3), unbiased=False), rtol=1e-5,
                               atol=1e-6)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.slimops.conv2d_bn_act_train(*(mode.from_tensor(a) if isinstance(
            a, torch.Tensor) else a for a in args))
    assert [t.dtype for t in fake] == [torch.float16, torch.float16, torch.float32,
                                       torch.float32]
