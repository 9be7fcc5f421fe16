"""slimops.ops.conv2d_bn_act_train: conv + training-mode switchable BN + residual + activation,
statistics from the conv's epilogue on the GPU (Triton); two ops elsewhere.

On the CPU the op's implementation is the two ops it fuses, so these tests check its
contract (schema, fake, autograd: opcheck and float64 gradcheck, against the reference) and
its use by ``SlimConvBNAct`` in training (enabled here by pretending the fused path is
available); the fused Triton implementation is checked under the interpreter in
tests/kernels/.
"""

import copy

import pytest
import torch

from slimops import reference
from slimops.ops import _backend
from slimops.models import slim_cnn
from slimops.nn import SlimConvBNAct
from slimops.ops import conv2d_bn_act as fused
from slimops.width import width as scoped_width

pytestmark = pytest.mark.skipif(not _backend.HAS_C, reason="needs the compiled extension")

ACT = {None: 0, "relu": 1, "relu6": 2}


def _args(dtype, cin=5, cout=6, full=(12, 10), k=3, stride=1, groups=1, residual=False,
          activation="relu"):
    torch.manual_seed(0)
    x = torch.randn(2, cin, 7, 6, dtype=dtype)
    w = torch.randn(full[0], full[1] // groups, k, k, dtype=dtype)
    b = torch.randn(full[0], dtype=dtype)
    gamma = torch.rand(cout, dtype=dtype) + 0.5
    beta = torch.randn(cout, dtype=dtype)
    p = k // 2
    ho = (7 + 2 * p - k) // stride + 1
    wo = (6 + 2 * p - k) // stride + 1
    r = torch.randn(2, cout, ho, wo, dtype=dtype) if residual else None
    return (x, w, b, cout, [stride, stride], [p, p], [1, 1], groups, gamma, beta, 1e-5, r,
            ACT[activation])


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cin,cout,k,stride,groups", [(5, 6, 3, 1, 1), (3, 1, 1, 2, 1),
                                                      (4, 6, 3, 2, 2)])
def test_equals_reference_conv_then_training_bn(cin, cout, k, stride, groups, residual,
                                                activation):
    args = _args(torch.float64, cin, cout, (12, 10), k, stride, groups, residual, activation)
    x, w, b, cout, s, p, d, g, gamma, beta, eps, r, _ = args
    out, mean, var = fused.conv2d_bn_act_train(*args)
    z = reference.conv2d(x, w, b, cout, s, p, d, g)
    expected = reference.batch_norm_act(z, gamma, beta, None, None, True, eps=eps, residual=r,
                                        activation=activation)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mean, z.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, z.var(dim=(0, 2, 3), unbiased=False))


@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_float64(residual):
    x, w, b, cout, s, p, d, g, gamma, beta, eps, r, act = _args(torch.float64, residual=residual,
                                                               activation="relu6")
    tensors = [t.requires_grad_() for t in (x, w, b, gamma, beta)] + (
        [r.requires_grad_()] if residual else [])

    def f(x, w, b, gamma, beta, *rest):
        return fused.conv2d_bn_act_train(x, w, b, cout, s, p, d, g, gamma, beta, eps,
                                         rest[0] if rest else None, act)[0]

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    args = _args(dtype, residual=True)
    for i in (0, 1, 2, 8, 9, 11):
        args[i].requires_grad_()
    torch.library.opcheck(torch.ops.slimops.conv2d_bn_act_train.default, args)


def _dw_args(dtype, c=5, full=9, k=3, stride=1, dilation=1, residual=False, activation="relu6"):
    torch.manual_seed(0)
    x = torch.randn(2, c, 7, 6, dtype=dtype)
    w = torch.randn(full, 1, k, k, dtype=dtype)
    b = torch.randn(full, dtype=dtype)
    gamma = torch.rand(c, dtype=dtype) + 0.5
    beta = torch.randn(c, dtype=dtype)
    p = dilation * (k // 2)
    ho = (7 + 2 * p - dilation * (k - 1) - 1) // stride + 1
    wo = (6 + 2 * p - dilation * (k - 1) - 1) // stride + 1
    r = torch.randn(2, c, ho, wo, dtype=dtype) if residual else None
    return (x, w, b, [stride, stride], [p, p], [dilation, dilation], gamma, beta, 1e-5, r,
            ACT[activation])


@pytest.mark.parametrize("activation", [None, "relu6"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("k,stride,dilation", [(3, 1, 1), (5, 2, 1), (3, 1, 2)])
def test_depthwise_equals_reference(k, stride, dilation, residual, activation):
    args = _dw_args(torch.float64, k=k, stride=stride, dilation=dilation, residual=residual,
                    activation=activation)
    x, w, b, s, p, d, gamma, beta, eps, r, _ = args
    out, mean, var = fused.depthwise_conv2d_bn_act_train(*args)
    z = reference.depthwise_conv2d(x, w, b, s, p, d)
    expected = reference.batch_norm_act(z, gamma, beta, None, None, True, eps=eps, residual=r,
                                        activation=activation)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mean, z.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, z.var(dim=(0, 2, 3), unbiased=False))


def test_depthwise_gradcheck_and_opcheck():
    x, w, b, s, p, d, gamma, beta, eps, r, act = _dw_args(torch.float64, residual=True)
    tensors = [t.requires_grad_() for t in (x, w, b, gamma, beta, r)]

    def f(x, w, b, gamma, beta, r):
        return fused.depthwise_conv2d_bn_act_train(x, w, b, s, p, d, gamma, beta, eps, r,
                                                   act)[0]

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-5)
    for dtype in (torch.float32, torch.float64):
        args = _dw_args(dtype, residual=True)
        for i in (0, 1, 2, 6, 7, 9):
            args[i].requires_grad_()
        torch.library.opcheck(torch.ops.slimops.depthwise_conv2d_bn_act_train.default, args)


def test_fused_path_is_only_for_cuda():
    assert not fused.fused_train_available(torch.randn(1, 3, 4, 4))


@pytest.fixture
def fused_everywhere(monkeypatch):
    """Let SlimConvBNAct take the fused-statistics path on CPU tensors (its CPU
    implementation is the two-op path it replaces on the GPU)."""
    calls = []

    def available(x, weight=None):
        calls.append(x.device.type)
        return True

    monkeypatch.setattr(fused, "fused_train_available", available)
    return calls


def _train_step(model, x, w):
    model.train()
    with scoped_width(model, w):
        out = model(x)
        out.square().mean().backward()
    return out.detach()


@pytest.mark.parametrize("w", [0.25, 0.5, 1.0])
def test_model_training_with_fused_statistics_equals_two_ops(w, fused_everywhere):
    torch.manual_seed(0)
    base = slim_cnn()
    x = torch.randn(4, 3, 16, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "fused_train_available", lambda x, w=None: False)
        two_ops = copy.deepcopy(base)
        expected = _train_step(two_ops, x, w)
    one_op = copy.deepcopy(base)
    got = _train_step(one_op, x, w)
    assert fused_everywhere  # the fused path was asked for
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(one_op.named_parameters(), two_ops.parameters()):
        if b.grad is None:
            assert a.grad is None, name
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(one_op.named_buffers(), two_ops.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # running stats


def test_fused_path_errors_name_the_layer(fused_everywhere):
    block = SlimConvBNAct([3, 6], [4, 8], 3, widths=[0.5, 1.0]).train()
    with scoped_width(block, 1.0), pytest.raises(ValueError, match="channels"):
        block(torch.randn(2, 3, 5, 5))  # width 1.0 takes 6 channels
    with scoped_width(block, 1.0), pytest.raises(ValueError, match="residual"):
        block(torch.randn(2, 6, 5, 5), torch.randn(2, 8, 4, 4))
    with scoped_width(block, 1.0), pytest.raises(ValueError, match="more than 1 value"):
        block(torch.randn(1, 6, 1, 1))
