"""The ``*_unchecked`` op entries (``slimops.ops``): what the layers call after validating
their arguments themselves. They choose the backend exactly as the checked entries do, give
the same results and gradients on the compiled kernels and on the reference path, and a
wrong argument still raises (from the kernel's own checks), never crashes."""

from __future__ import annotations

import pytest
import torch

from slimops import ops, reference
from slimops.ops import _backend
from slimops.reference import ACTIVATION_CODES

F64 = torch.float64


def _conv_case(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 7, dtype=dtype, generator=g)
    w = torch.randn(10, 8, 3, 3, dtype=dtype, generator=g)
    b = torch.randn(10, dtype=dtype, generator=g)
    scale = torch.rand(8, dtype=dtype, generator=g) + 0.5
    shift = torch.randn(8, dtype=dtype, generator=g)
    res = torch.randn(2, 8, 5, 4, dtype=dtype, generator=g)
    checked = lambda *t: ops.conv2d(*t[:3], 8, 2, 1, 1, 1, *t[3:], "relu6")  # noqa: E731
    unchecked = lambda *t: ops.conv2d_unchecked(*t[:3], 8, [2, 2], [1, 1], [1, 1], 1,  # noqa: E731
                                                *t[3:], ACTIVATION_CODES["relu6"])
    return (x, w, b, scale, shift, res), checked, unchecked


def _depthwise_case(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, 6, dtype=dtype, generator=g)
    w = torch.randn(9, 1, 3, 3, dtype=dtype, generator=g)
    scale = torch.rand(5, dtype=dtype, generator=g) + 0.5
    shift = torch.randn(5, dtype=dtype, generator=g)
    res = torch.randn(2, 5, 8, 6, dtype=dtype, generator=g)
    checked = lambda x, w, *t: ops.depthwise_conv2d(x, w, None, 1, 1, 1, *t, "relu")  # noqa: E731
    unchecked = lambda x, w, *t: ops.depthwise_conv2d_unchecked(  # noqa: E731
        x, w, None, [1, 1], [1, 1], [1, 1], *t, ACTIVATION_CODES["relu"])
    return (x, w, scale, shift, res), checked, unchecked


def _linear_case(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, dtype=dtype, generator=g)
    w = torch.randn(9, 7, dtype=dtype, generator=g)
    b = torch.randn(9, dtype=dtype, generator=g)
    return ((x, w, b), lambda *t: ops.linear(*t, 6),
            lambda *t: ops.linear_unchecked(*t, 6))


def _batch_norm_case(dtype, training):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, 3, dtype=dtype, generator=g)
    w = torch.rand(6, dtype=dtype, generator=g) + 0.5
    b = torch.randn(6, dtype=dtype, generator=g)
    res = torch.randn(4, 6, 5, 3, dtype=dtype, generator=g)
    stats = {}

    def running(key):
        # each entry updates its own copy of the running statistics, compared after
        if key not in stats:
            stats[key] = (torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype))
        return stats[key]

    checked = lambda x, w, b, r: ops.batch_norm_act(  # noqa: E731
        x, w, b, *running("checked"), training, 0.2, 1e-4, r, "relu")
    unchecked = lambda x, w, b, r: ops.batch_norm_act_unchecked(  # noqa: E731
        x, w, b, *running("unchecked"), training, 0.2, 1e-4, r, ACTIVATION_CODES["relu"])
    return (x, w, b, res), checked, unchecked, stats


CASES = {
    "conv2d": lambda dtype: _conv_case(dtype),
    "depthwise_conv2d": lambda dtype: _depthwise_case(dtype),
    "linear": lambda dtype: _linear_case(dtype),
    "batch_norm_act_train": lambda dtype: _batch_norm_case(dtype, True)[:3],
    "batch_norm_act_eval": lambda dtype: _batch_norm_case(dtype, False)[:3],
}


@pytest.mark.parametrize("path", ["native", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_unchecked_equals_checked(name, path, monkeypatch):
    if path == "native" and not _backend.HAS_C:
        pytest.skip("the compiled extension is not built")
    if path == "reference":
        monkeypatch.setattr(_backend, "HAS_C", False)
    tensors, checked, unchecked = CASES[name](F64)
    leaves_a = [t.clone().requires_grad_() for t in tensors]
    leaves_b = [t.clone().requires_grad_() for t in tensors]
    out_a, out_b = checked(*leaves_a), unchecked(*leaves_b)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    grad = torch.randn_like(out_a)
    out_a.backward(grad)
    out_b.backward(grad)
    for a, b in zip(leaves_a, leaves_b):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


def test_batch_norm_unchecked_updates_running_stats_as_checked():
    tensors, checked, unchecked, stats = _batch_norm_case(F64, True)
    checked(*tensors)
    unchecked(*tensors)
    for a, b in zip(stats["checked"], stats["unchecked"]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_unchecked_reference_path_matches_the_oracle(monkeypatch):
    # bfloat16 has no CPU kernel: the unchecked entry must still choose the reference.
    tensors, _, unchecked = _conv_case(torch.bfloat16)
    x, w, b, scale, shift, res = tensors
    expected = reference.conv2d(x, w, b, 8, [2, 2], [1, 1], [1, 1], 1, scale, shift, res,
                                "relu6")
    torch.testing.assert_close(unchecked(*tensors), expected, rtol=0, atol=0)


@pytest.mark.skipif(not _backend.HAS_C, reason="the compiled extension is not built")
def test_unchecked_bad_arguments_raise_from_the_kernel():
    x = torch.randn(2, 5)
    w = torch.randn(9, 7)
    with pytest.raises(RuntimeError, match="slimops::linear"):
        ops.linear_unchecked(torch.randn(2, 8), w, None, 6)  # more features than the weight
    with pytest.raises(RuntimeError, match="slimops::linear"):
        ops.linear_unchecked(x, w, torch.randn(3), 6)  # bias of the wrong length
    with pytest.raises(RuntimeError, match="slimops::conv2d"):
        ops.conv2d_unchecked(torch.randn(1, 6, 4, 4), torch.randn(8, 6, 3, 3), None, 8,
                             [1, 1], [0, 0], [1, 1], 1, None, None,
                             torch.randn(1, 8, 3, 3), 0)  # residual of the wrong shape
    with pytest.raises(RuntimeError, match="slimops::batch_norm_act"):
        ops.batch_norm_act_unchecked(torch.randn(2, 4, 3, 3), torch.randn(5), None, None,
                                     None, True, 0.1, 1e-5, None, 0)


# ---- the CPU-kernel entries (``*_cpu_kernel``): the result, or None, never an error --------

def _cpu_kernel_calls(dtype):
    """(``conv2d_cpu_kernel`` call, its ``conv2d_unchecked`` twin) per op, on the cases above."""
    (x, w, b, scale, shift, res), _, _ = _conv_case(dtype)
    conv = ((x, w, b, 8, [2, 2], [1, 1], [1, 1], 1, scale, shift, res, 2),
            ops.conv2d_cpu_kernel, ops.conv2d_unchecked)
    (x, w, scale, shift, res), _, _ = _depthwise_case(dtype)
    depthwise = ((x, w, None, (1, 1), (1, 1), (1, 1), scale, shift, res, 1),
                 ops.depthwise_conv2d_cpu_kernel, ops.depthwise_conv2d_unchecked)
    return {"conv2d": conv, "depthwise_conv2d": depthwise}


@pytest.mark.skipif(not _backend.HAS_C, reason="the compiled extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", ["conv2d", "depthwise_conv2d"])
def test_cpu_kernel_entry_equals_the_unchecked_entry(name, dtype):
    args, kernel, unchecked = _cpu_kernel_calls(dtype)[name]
    torch.testing.assert_close(kernel(*args), unchecked(*args), rtol=0, atol=0)


@pytest.mark.skipif(not _backend.HAS_C, reason="the compiled extension is not built")
@pytest.mark.parametrize("name", ["conv2d", "depthwise_conv2d"])
def test_cpu_kernel_entry_gives_none_where_the_kernel_rejects_or_does_not_run(name):
    args, kernel, _ = _cpu_kernel_calls(torch.float32)[name]
    res = args[-2]

    def with_(i, value):
        return args[:i] + (value,) + args[i + 1:]

    n = len(args)
    rejected = {
        "residual shape": with_(n - 2, res[:, :, :1]),
        "residual dtype": with_(n - 2, res.double()),
        "scale length": with_(n - 4, args[n - 4][:-1]),
        "input channels over the weight's": with_(0, torch.randn(2, 11, 8, 6)),
        "not a tensor": with_(n - 2, 3),
        "activation code": with_(n - 1, 7),
        "bfloat16 (the reference's dtype)": tuple(
            a.bfloat16() if isinstance(a, torch.Tensor) else a for a in args),
        "non-contiguous weight": with_(1, args[1].transpose(2, 3)),
    }
    for what, bad in rejected.items():
        assert kernel(*bad) is None, what
    # and under a __torch_function__ mode the direct entry declines (NotImplemented)
    with _PassThroughMode():
        assert kernel(*args) is None


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
