"""NaN and Inf through the Triton kernels' fused activations, forward and backward, as torch
propagates them (the CPU kernels' rules, tests/test_ops_non_finite.py): relu(NaN) is NaN (not
0), relu6(+Inf) is 6 and relu6(-Inf) 0; in the backward relu passes a NaN output's gradient
(threshold_backward zeroes only where out <= 0) and relu6 gives it 0 (hardtanh_backward keeps
only 0 < out < 6).

tl.maximum drops NaN (on the GPU and in the interpreter, which runs it as np.fmax), so
relu(NaN) came out 0 before the kernels selected on comparisons instead. Without a GPU these
run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the non-finite
values enter through the residual, at known positions in every channel.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from slimops import reference  # noqa: E402
from slimops.ops import _backend  # noqa: E402
from slimops.kernels import batch_norm_act as KB  # noqa: E402
from slimops.kernels import conv2d as KC  # noqa: E402
from slimops.kernels import depthwise_conv2d as KD  # noqa: E402
from slimops.kernels import epilogue as KE  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VALUES = [float("nan"), float("inf"), float("-inf")]
VALUE_IDS = ["nan", "inf", "-inf"]
ACTS = {1: "relu", 2: "relu6"}
TOL = dict(rtol=1e-4, atol=1e-4, equal_nan=True)


def _poisoned(shape, value):
    r = torch.randn(*shape, device=DEVICE)
    flat = r.view(-1)
    flat[:: max(1, flat.numel() // 7)] = value
    return r


@pytest.mark.parametrize("activation", [1, 2], ids=["relu", "relu6"])
@pytest.mark.parametrize("value", VALUES, ids=VALUE_IDS)
def test_epilogue(value, activation):
    z = torch.randn(2, 5, 6, 7, device=DEVICE)
    residual = _poisoned(z.shape, value)
    out = KE.epilogue(z, None, None, None, residual, activation)
    expected = reference.activate(z + residual, ACTS[activation])
    assert out.isnan().sum() == expected.isnan().sum()
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("activation", [1, 2], ids=["relu", "relu6"])
def test_epilogue_backward_at_non_finite_outputs(activation):
    out = torch.tensor([float("nan"), float("inf"), 6.0, 0.0, 3.0, float("nan"), 1.0],
                       device=DEVICE).view(1, 7)
    grad = torch.arange(1.0, 8.0, device=DEVICE).view(1, 7)
    result = KE.epilogue_backward(grad, out, None, activation)
    if activation == 1:
        expected = [1.0, 2.0, 3.0, 0.0, 5.0, 6.0, 7.0]   # NaN and Inf outputs pass
    else:
        expected = [0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 7.0]   # only 0 < out < 6 passes
    torch.testing.assert_close(result, torch.tensor(expected, device=DEVICE).view(1, 7))
    if _backend.HAS_C and DEVICE == "cpu":  # the CPU kernels' rule, held to torch
        torch.testing.assert_close(result, torch.ops.slimops.epilogue_backward(
            grad, out, None, activation))


@pytest.mark.parametrize("activation", [1, 2], ids=["relu", "relu6"])
@pytest.mark.parametrize("value", VALUES, ids=VALUE_IDS)
def test_conv2d(value, activation):
    x = torch.randn(2, 5, 9, 11, device=DEVICE)
    weight = torch.randn(10, 8, 3, 3, device=DEVICE)
    bias = torch.randn(10, device=DEVICE)
    residual = _poisoned((2, 7, 9, 11), value)
    out = KC.conv2d(x, weight, bias, 7, [1, 1], [1, 1], [1, 1], 1, None, None, residual,
                    activation)
    expected = reference.conv2d(x, weight, bias, 7, 1, 1, 1, 1, None, None, residual,
                                ACTS[activation])
    assert out.isnan().sum() == expected.isnan().sum()
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("activation", [1, 2], ids=["relu", "relu6"])
@pytest.mark.parametrize("value", VALUES, ids=VALUE_IDS)
def test_depthwise_conv2d(value, activation):
    x = torch.randn(2, 6, 9, 11, device=DEVICE)
    weight = torch.randn(8, 1, 3, 3, device=DEVICE)
    scale, shift = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    residual = _poisoned((2, 6, 9, 11), value)
    out = KD.depthwise_conv2d(x, weight, None, [1, 1], [1, 1], [1, 1], scale, shift, residual,
                              activation)
    expected = reference.depthwise_conv2d(x, weight, None, 1, 1, 1, scale, shift, residual,
                                          ACTS[activation])
    assert out.isnan().sum() == expected.isnan().sum()
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [1, 2], ids=["relu", "relu6"])
@pytest.mark.parametrize("value", VALUES, ids=VALUE_IDS)
def test_batch_norm_act(value, activation, training):
    x = torch.randn(3, 6, 5, 7, device=DEVICE)
    weight, bias = torch.rand(6, device=DEVICE) + 0.5, torch.randn(6, device=DEVICE)
    mean = None if training else torch.randn(6, device=DEVICE)
    var = None if training else torch.rand(6, device=DEVICE) + 0.5
    residual = _poisoned(x.shape, value)
    out, m, v = KB.batch_norm_act(x, weight, bias, mean, var, training, 1e-5, residual,
                                  activation)
    expected = reference.batch_norm_act(x, weight, bias, mean, var, training, eps=1e-5,
                                        residual=residual, activation=ACTS[activation])
    assert out.isnan().sum() == expected.isnan().sum()
    torch.testing.assert_close(out, expected, **TOL)
    # The backward reads the activation's mask from this output, NaNs included: compared
    # with the CPU kernels, whose rule tests/test_ops_non_finite.py holds to torch.
    if _backend.HAS_C and DEVICE == "cpu":
        g = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
        got = KB.batch_norm_act_backward(g, x, out, weight, m, v, 1e-5, training, activation)
        cpu = torch.ops.slimops.batch_norm_act_backward(g, x, out, weight, m, v, 1e-5,
                                                        training, activation)
        for a, b in zip(got, cpu):
            torch.testing.assert_close(a, b, **TOL)
