"""The narrow GEMM (csrc/cpu/gemm_narrow.cpp) behind slimops::conv2d's forward on the im2col +
GEMM path: float32 products of two to four vectors of output columns (a 5x5 to 8x8 plane at
batch 1 under AVX-512, 3x3 to 4x4 under AVX2), depth of at least 256 and a weight block of at
least 2^17 elements per task.

Every case runs the op with SLIMOPS_CONV_NARROW=1 and =0 (BLAS; the switch is read on every
call), forward and every gradient, each against the reference. The direct kernels are switched
off so that the GEMM path runs whatever the plane; the suite's fixed route keeps oneDNN out at a
partial input width. test_narrow_path_is_taken shows that the switch does change the path.
test_cpu_isa.py runs this file again under the AVX2 and baseline caps (under the baseline the
op has no narrow kernel and both runs take BLAS)."""
from __future__ import annotations

import pytest
import torch

import slimops
from slimops import reference

from helpers import check_conv2d_switch

pytestmark = pytest.mark.skipif(
    slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
)

ISA = slimops.backend_info().get("cpu_isa", "base")
LANES = {"avx512": 16, "avx2": 8}.get(ISA, 0)


@pytest.fixture(autouse=True)
def _gemm_path(monkeypatch):
    monkeypatch.setenv("SLIMOPS_CONV_DIRECT", "0")
    monkeypatch.setenv("SLIMOPS_CONV_WINOGRAD", "0")


def check_both_paths(kwargs, monkeypatch, tol):
    return check_conv2d_switch(kwargs, monkeypatch, tol, "SLIMOPS_CONV_NARROW")


# (channels in/out of the active prefix, full weight in/out, input H x W, kernel, stride,
#  padding, groups, batch). Depths 255 to 4500 (both sides of the floor: 256 takes the narrow
#  kernel, 255 BLAS either way), planes of 9 to 64 outputs (one to four AVX-512 vectors, two
#  to eight AVX2 ones: both sides of each ISA's range), row counts that leave partial tiles of
#  every height. 7x7 and 3x11 planes (49 and 33 columns) take the tail
#  form under AVX-512 (a column past whole vectors as a dot product), at depths of whole
#  vectors (576, 528) and not (600: the last partial vector of depth).
CASES = {
    "k1_5x5": (520, 500, 528, 512, (5, 5), (1, 1), 1, 0, 1, 1),
    "k1_7x7": (600, 263, 640, 272, (7, 7), (1, 1), 1, 0, 1, 1),
    "k3_7x7_whole_vectors": (64, 500, 72, 512, (7, 7), (3, 3), 1, 1, 1, 1),
    "k1_3x11": (528, 263, 544, 272, (3, 11), (1, 1), 1, 0, 1, 1),
    "k1_8x8": (530, 301, 544, 320, (8, 8), (1, 1), 1, 0, 1, 1),
    "k1_3x3": (1000, 150, 1024, 160, (3, 3), (1, 1), 1, 0, 1, 1),
    "k1_s2_to_4x5": (700, 201, 704, 208, (8, 10), (1, 1), 2, 0, 1, 1),
    "k3_6x6": (72, 419, 80, 432, (6, 6), (3, 3), 1, 1, 1, 1),
    "k3_s2_to_7x7": (66, 333, 72, 336, (14, 13), (3, 3), 2, 1, 1, 1),
    "k3_p0_odd": (63, 250, 64, 256, (7, 9), (3, 3), 1, 0, 1, 1),
    "k3_4x3": (120, 199, 128, 200, (4, 3), (3, 3), 1, 1, 1, 1),
    "groups2": (144, 600, 160, 640, (6, 6), (3, 3), 1, 1, 2, 1),
    "batch2_images": (600, 300, 608, 304, (5, 5), (1, 1), 1, 0, 1, 2),
    "k1_7x7_depth256": (256, 1030, 320, 1040, (7, 7), (1, 1), 1, 0, 1, 1),
    "k1_4x4_depth256": (256, 700, 264, 704, (4, 4), (1, 1), 1, 0, 1, 1),
    "k1_7x7_depth255": (255, 1030, 320, 1040, (7, 7), (1, 1), 1, 0, 1, 1),
}


def _kwargs(case):
    ci, co, wi, wo, (h, w), kernel, stride, padding, groups, n = CASES[case]
    weight = torch.randn(wo, wi // groups, *kernel) / (wi * kernel[0] * kernel[1]) ** 0.5
    return dict(input=torch.randn(n, ci, h, w), weight=weight, bias=None, out_channels=co,
                stride=stride, padding=padding, dilation=1, groups=groups)


@pytest.mark.parametrize("threads", ["one_thread", "all_threads"])
@pytest.mark.parametrize("case", list(CASES))
def test_narrow_matches_reference(case, threads, request, monkeypatch, tol):
    request.getfixturevalue(threads)
    check_both_paths(_kwargs(case), monkeypatch, tol)


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_narrow_epilogue(act, all_threads, monkeypatch, tol):
    kwargs = _kwargs("k1_7x7")
    o = kwargs["out_channels"]
    kwargs.update(bias=torch.randn(kwargs["weight"].shape[0]), scale=torch.rand(o) + 0.5,
                  shift=torch.randn(o), residual=torch.randn(1, o, 7, 7), activation=act)
    check_both_paths(kwargs, monkeypatch, tol)


@pytest.mark.skipif(not LANES, reason="no narrow kernel under the baseline cap")
def test_narrow_path_is_taken(one_thread, monkeypatch):
    """A 4500-deep product with 20 columns (two AVX-512 vectors, three AVX2 ones): the narrow
    kernel sums each output over the whole depth in order, BLAS in blocks of the depth, so the
    two forwards differ in their last bits; identical results would mean the switch did not
    change the path."""
    weight = torch.randn(64, 512, 3, 3) / 48
    x = torch.randn(1, 500, 4, 5)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SLIMOPS_CONV_NARROW", flag)
        with torch.inference_mode():
            outs.append(slimops.ops.conv2d(x, weight, None, 60, 1, 1))
    assert not torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], reference.conv2d(x, weight, None, 60, 1, 1),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_narrow_propagates_non_finite_values_as_torch(value, monkeypatch):
    """A NaN or Inf in the input or the weight prefix reaches the same outputs as in the
    reference; one past the prefix (a weight row or column the width does not use) reaches
    none, although the kernel's padding columns and padding rows multiply with zeros."""
    weight = torch.randn(272, 640, 1, 1) / 25
    x = torch.randn(1, 600, 7, 7)
    x[0, 17, 3, 4] = value
    x[0, 40, 6, 6] = value  # output column 48: the tail column under AVX-512
    weight[5, 100] = value
    weight[270, 3] = value  # row 270 >= out_channels 263: unused
    weight[7, 620] = value  # column 620 >= the input's 600 channels: unused
    kwargs = dict(input=x, weight=weight, bias=None, out_channels=263)
    exp = reference.conv2d(**kwargs)
    monkeypatch.setenv("SLIMOPS_CONV_NARROW", "1")
    got = slimops.ops.conv2d(**kwargs)
    assert torch.equal(torch.isnan(got), torch.isnan(exp))
    assert torch.equal(torch.isposinf(got), torch.isposinf(exp))
    assert torch.equal(torch.isneginf(got), torch.isneginf(exp))


def test_narrow_reads_the_weight_prefix_in_place(monkeypatch):
    """No copy of the shared weight, whole or prefix, in the forward and backward ops on the
    narrow path (test_ops_no_weight_copy.py's profiler check, on a shape that takes it)."""
    from test_ops_no_weight_copy import assert_no_weight_copy, conv_weight_shapes, profiled

    monkeypatch.setenv("SLIMOPS_CONV_NARROW", "1")
    weight = torch.randn(272, 640, 1, 1, requires_grad=True)
    x = torch.randn(1, 600, 7, 7, requires_grad=True)

    def run():
        out = slimops.ops.conv2d(x, weight, None, 263)
        torch.autograd.grad(out, (x, weight), torch.randn_like(out))

    assert_no_weight_copy(profiled(run), conv_weight_shapes(weight.shape, 1, 263, 600),
                          ["slimops::conv2d", "slimops::conv2d_backward"])
