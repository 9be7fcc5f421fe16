"""slimops.ops.max_pool2d_inference (csrc/cpu/max_pool.h): F.max_pool2d of a contiguous NCHW
CPU batch, no indices, by slimops' kernel, equal to PyTorch's result to the bit (values, the
sign of zero maxima, NaN), or None where the kernel does not run. test_cpu_isa.py runs this
file again under the AVX2 and baseline caps."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import slimops
from slimops.nn import MaxPool2d
from slimops.ops import max_pool2d_inference

pytestmark = pytest.mark.skipif(
    slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _assert_same_bits(got, exp):
    assert got is not None and got.is_contiguous() and got.shape == exp.shape
    assert torch.equal(_bits(got), _bits(exp))


def _values(shape, dtype=torch.float32, seed=0):
    """Random values with ties of +0 and -0 (as after a ReLU, and its negation), so that a
    window's maximum is often a zero of either sign: which one is kept depends on the order the
    taps are visited in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    zeros = torch.rand(shape, generator=g) < 0.5
    signs = torch.rand(shape, generator=g) < 0.5
    x = torch.where(zeros & (x < 0), torch.where(signs, 0.0, -0.0).to(dtype), x)
    return x


# (kernel, stride, padding, dilation): every case of PyTorch's geometry rules the kernel
# treats alike, and the shapes that stress the field (strides 1-3, dilations, rectangles).
GEOMETRIES = [
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (0, 0), (1, 1)),
    ((2, 2), (2, 2), (0, 0), (1, 1)),
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (1, 1), (2, 2)),
    ((3, 2), (1, 2), (1, 0), (1, 1)),
    ((5, 5), (3, 3), (2, 2), (1, 1)),
    ((4, 3), (3, 2), (2, 1), (2, 3)),
    ((1, 1), (2, 3), (0, 0), (1, 1)),
    ((7, 1), (1, 1), (3, 0), (1, 1)),
]
SHAPES = [(1, 3, 112, 112), (2, 5, 17, 23), (1, 2, 9, 8), (3, 1, 1, 40), (1, 4, 33, 31)]


def _fits(shape, k, p, d):
    return all(side + 2 * pp >= dd * (kk - 1) + 1 for side, kk, pp, dd in zip(shape[2:], k, p, d))


CASES = [(g, s, c) for g, s, c in itertools.product(range(len(GEOMETRIES)), SHAPES, (False, True))
         if _fits(s, GEOMETRIES[g][0], GEOMETRIES[g][2], GEOMETRIES[g][3])]


@pytest.mark.parametrize("geometry,shape,ceil_mode", CASES)
def test_matches_pytorch_to_the_bit(geometry, shape, ceil_mode):
    k, s, p, d = GEOMETRIES[geometry]
    x = _values(shape, seed=geometry)
    exp = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode)
    _assert_same_bits(max_pool2d_inference(x, k, s, p, d, ceil_mode), exp)


@pytest.mark.parametrize("threads", ["one_thread", "all_threads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_threads(dtype, threads, request):
    request.getfixturevalue(threads)
    x = _values((2, 40, 56, 57), dtype=dtype)
    _assert_same_bits(max_pool2d_inference(x, 3, 2, 1, 1, False), F.max_pool2d(x, 3, 2, 1))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_as_pytorch(value):
    """NaN wins its windows (the last NaN visited, as PyTorch keeps it), +-Inf are ordinary
    maxima / never maxima; a plane of -inf pools to -inf."""
    x = _values((2, 6, 15, 16))
    x[0, 3, 4, 5] = value
    x[1, :, 0, :] = value
    x[1, 2] = value
    x[0, 1, 7, 7] = float("nan")
    x[0, 1, 7, 8] = -float("nan")
    exp = F.max_pool2d(x, 3, 2, 1)
    _assert_same_bits(max_pool2d_inference(x, 3, 2, 1, 1, False), exp)


def test_tall_and_wide_windows():
    """Any kernel size PyTorch accepts (the kernel keeps a row pointer per kernel row)."""
    x = _values((1, 2, 70, 66))
    for k, p in (((65, 1), (32, 0)), ((3, 66), (1, 33))):
        _assert_same_bits(max_pool2d_inference(x, k, 1, p, 1, False), F.max_pool2d(x, k, 1, p))


def test_stride_none_and_int_forms():
    x = _values((1, 3, 10, 11))
    _assert_same_bits(max_pool2d_inference(x, 3, None, 1, 1, False), F.max_pool2d(x, 3, None, 1))
    _assert_same_bits(max_pool2d_inference(x, [2, 3], (), [1, 0], [1, 1], True),
                      F.max_pool2d(x, [2, 3], (), [1, 0], [1, 1], ceil_mode=True))


@pytest.mark.parametrize("case", ["channels_last", "strided", "requires_grad", "bfloat16",
                                  "three_d", "empty", "tracing", "subclass", "pad_too_big",
                                  "window_too_big", "not_a_pair"])
def test_returns_none_where_the_kernel_does_not_run(case):
    x = _values((1, 3, 9, 9))
    args = [3, 2, 1, 1, False]
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "strided":
        x = x[:, :, :, ::2]
    elif case == "requires_grad":
        x.requires_grad_()
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "three_d":
        x = x[0]
    elif case == "empty":
        x = x[:0]
    elif case == "subclass":
        x = torch.nn.Parameter(x, requires_grad=False)
    elif case == "pad_too_big":
        args = [3, 2, 2, 1, False]
    elif case == "window_too_big":
        args = [5, 1, 0, 3, False]
    elif case == "not_a_pair":
        args = [(3, 3, 3), 2, 1, 1, False]
    if case == "tracing":
        seen = []
        torch.jit.trace(lambda t: (seen.append(max_pool2d_inference(t, *args)), t)[1], (x,),
                        check_trace=False)
        assert seen == [None]
        return
    with torch.no_grad() if case != "requires_grad" else torch.enable_grad():
        assert max_pool2d_inference(x, *args) is None


def test_geometry_errors_are_checked_in_cpp():
    """The C++ entry checks what its Python caller filters (a direct call with a bad geometry
    raises, never reads out of bounds)."""
    entry = slimops._C.max_pool2d
    x = _values((1, 2, 5, 5))
    with pytest.raises(RuntimeError, match="padding"):
        entry(x, 3, 3, 1, 1, 2, 2, 1, 1, False)
    with pytest.raises(RuntimeError, match="positive"):
        entry(x, 3, 3, 0, 1, 1, 1, 1, 1, False)
    with pytest.raises(RuntimeError, match="empty"):
        entry(x, 3, 3, 1, 1, 0, 0, 3, 3, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        entry(x.transpose(2, 3), 3, 3, 1, 1, 1, 1, 1, 1, False)
    assert entry(x, 3, 3, 1, 1, 1, 1, 1, 1, "no") is NotImplemented


def test_layer_uses_it_and_scripted_and_traced_layers_still_pool():
    """MaxPool2d's inference path runs the kernel (the profiler sees its record); a scripted
    layer and a traced one take PyTorch's op and give the same result."""
    layer = MaxPool2d(3, 2, 1)
    x = _values((1, 8, 20, 21))
    exp = F.max_pool2d(x, 3, 2, 1)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got = layer(x)
    _assert_same_bits(got, exp)
    names = {e.name for e in prof.events()}
    assert "slimops::max_pool2d_inference" in names
    scripted = torch.jit.script(layer)
    traced = torch.jit.trace(layer, (x,))
    y = _values((1, 8, 20, 21), seed=5)
    with torch.inference_mode():
        assert torch.equal(scripted(y), F.max_pool2d(y, 3, 2, 1))
        assert torch.equal(traced(y), F.max_pool2d(y, 3, 2, 1))
