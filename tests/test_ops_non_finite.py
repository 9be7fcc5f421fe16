"""NaN and Inf through the fused epilogues' activations, forward and backward, exactly as torch
propagates them (the reference's F.relu / F.hardtanh and their threshold / hardtanh
backward): relu(NaN) is NaN (not 0), relu6(+Inf) is 6, relu passes a NaN output's incoming
gradient and relu6 (torch's vectorised hardtanh_backward) gives it 0.

The non-finite values enter through the residual, so they reach the activation at known
positions without spreading through a convolution first."""
from __future__ import annotations

import pytest
import torch

import slimops
from slimops import reference

from helpers import leaf

pytestmark = pytest.mark.skipif(
    slimops.backend_info()["cpu"] != "C++", reason="needs the compiled extension slimops._C"
)

VALUES = [float("nan"), float("inf"), float("-inf")]
ACTS = ["relu", "relu6"]


def _poisoned_residual(shape, value):
    r = torch.randn(*shape)
    flat = r.view(-1)
    flat[:: max(1, flat.numel() // 7)] = value  # a handful of positions, in every channel
    return r


def _compare(op, ref_op, kwargs, tol):
    def run(f):
        leaves = {k: leaf(v) if isinstance(v, torch.Tensor) and not k.startswith("running_")
                  else v for k, v in kwargs.items()}
        out = f(**leaves)
        g = torch.linspace(-1, 1, out.numel()).view_as(out)
        names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        return out, dict(zip(names, torch.autograd.grad(out, [leaves[k] for k in names], g)))

    out, grads = run(op)
    exp, exp_grads = run(ref_op)
    torch.testing.assert_close(out, exp, equal_nan=True, **tol(torch.float32, exp.nan_to_num()))
    for name, e in exp_grads.items():
        torch.testing.assert_close(grads[name], e, equal_nan=True,
                                   **tol(torch.float32, e.nan_to_num()),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("path", ["direct", "gemm", "full_width", "onednn"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("value", VALUES, ids=["nan", "inf", "-inf"])
def test_conv2d(value, act, path, monkeypatch, tol):
    monkeypatch.setenv("SLIMOPS_CONV_DIRECT", "0" if path == "gemm" else "1")
    if path == "onednn":  # the other route (csrc/cpu/route.h), with the same epilogue
        monkeypatch.setenv("SLIMOPS_CONV_ROUTE", "onednn")
    cin = 8 if path == "full_width" else 5
    weight = torch.randn(10, 8, 3, 3)
    kwargs = dict(input=torch.randn(2, cin, 14, 30), weight=weight, bias=torch.randn(10),
                  out_channels=7, stride=1, padding=1,
                  residual=_poisoned_residual((2, 7, 14, 30), value), activation=act)
    _compare(slimops.ops.conv2d, reference.conv2d, kwargs, tol)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("value", VALUES, ids=["nan", "inf", "-inf"])
def test_depthwise_conv2d(value, act, tol):
    kwargs = dict(input=torch.randn(2, 6, 9, 11), weight=torch.randn(8, 1, 3, 3),
                  bias=torch.randn(8), stride=1, padding=1, scale=torch.rand(6) + 0.5,
                  shift=torch.randn(6), residual=_poisoned_residual((2, 6, 9, 11), value),
                  activation=act)
    _compare(slimops.ops.depthwise_conv2d, reference.depthwise_conv2d, kwargs, tol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("value", VALUES, ids=["nan", "inf", "-inf"])
def test_batch_norm_act(value, act, training, tol):
    kwargs = dict(input=torch.randn(3, 6, 5, 7), weight=torch.rand(6) + 0.5, bias=torch.randn(6),
                  running_mean=None if training else torch.randn(6),
                  running_var=None if training else torch.rand(6) + 0.5, training=training,
                  residual=_poisoned_residual((3, 6, 5, 7), value), activation=act)
    _compare(slimops.ops.batch_norm_act, reference.batch_norm_act, kwargs, tol)
