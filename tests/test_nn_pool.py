"""slimops.nn.MaxPool2d / AvgPool2d: drop-in nn.MaxPool2d / nn.AvgPool2d whose CPU inference
forward pools a channels-last copy; every result must be the one PyTorch's layer gives, to
the bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimops.baselines import reference_style
from slimops.models import s_resnet50, s_shufflenet
from slimops.nn import AvgPool2d, MaxPool2d

# (kernel_size, stride, padding, dilation, ceil_mode): S-ResNet's stem pool, S-ShuffleNet's,
# and the rest of nn.MaxPool2d's geometry.
GEOMETRIES = {
    "resnet": (3, 2, 1, 1, False),
    "shufflenet": (3, 2, 0, 1, False),
    "ceil": (3, 2, 0, 1, True),
    "k2": (2, 2, 0, 1, False),
    "rect": ((3, 2), (1, 2), (1, 0), 1, False),
    "dilated": (3, 1, 1, 2, False),
}
SHAPES = [(1, 64, 112, 112), (3, 5, 17, 23), (2, 1, 9, 8), (1, 3, 1, 7)]


# (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override): S-ShuffleNet's
# units' pool, and the rest of nn.AvgPool2d's options.
AVG_GEOMETRIES = {
    "shufflenet": (3, 2, 1, False, True, None),
    "exclude_pad": (3, 2, 1, False, False, None),
    "ceil": (3, 2, 1, True, True, None),
    "divisor": (2, 1, 0, False, True, 3),
    "rect": ((3, 2), (2, 1), (1, 0), False, True, None),
}


def _pair(geometry):
    k, s, p, d, ceil = GEOMETRIES[geometry]
    return (MaxPool2d(k, s, p, d, ceil_mode=ceil), nn.MaxPool2d(k, s, p, d, ceil_mode=ceil))


def _avg_pair(geometry):
    args = AVG_GEOMETRIES[geometry]
    return AvgPool2d(*args), nn.AvgPool2d(*args)


def _fits(shape, geometry):
    k, s, p, d, ceil = GEOMETRIES[geometry]
    k = (k, k) if isinstance(k, int) else k
    d = (d, d) if isinstance(d, int) else d
    return all(side >= dd * (kk - 1) + 1 for side, kk, dd in zip(shape[2:], k, d))


def _cases():
    return [(g, s) for g in GEOMETRIES for s in SHAPES if _fits(s, g)]


@pytest.mark.parametrize("geometry,shape", _cases())
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "eval_without_grad"])
def test_inference_matches_nn_max_pool(geometry, shape, mode):
    ours, torchs = _pair(geometry)
    x = torch.relu(torch.randn(shape))  # ties of zeros, as after the stem's ReLU
    context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
               "eval_without_grad": torch.enable_grad}[mode]
    with context():
        got, exp = ours(x), torchs(x)
    assert got.is_contiguous() and got.shape == exp.shape
    assert torch.equal(got, exp)


@pytest.mark.parametrize("geometry", list(AVG_GEOMETRIES))
@pytest.mark.parametrize("shape", [(1, 24, 56, 56), (2, 240, 7, 9), (3, 5, 4, 3)])
def test_avg_inference_matches_nn_avg_pool(geometry, shape):
    ours, torchs = _avg_pair(geometry)
    x = torch.randn(shape)
    with torch.inference_mode():
        got, exp = ours(x), torchs(x)
    assert got.is_contiguous() and torch.equal(got, exp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    x = torch.randn(2, 6, 15, 13).to(dtype)
    with torch.inference_mode():
        for ours, torchs in (_pair("resnet"), _avg_pair("shufflenet")):
            assert torch.equal(ours(x), torchs(x))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_as_nn_max_pool(value):
    """NaN wins its windows (in both kernels), +-Inf are ordinary maxima / never maxima; the
    averages get NaN and +-Inf where PyTorch's do."""
    ours, torchs = _pair("resnet")
    x = torch.randn(2, 19, 11, 12)
    x[0, 3, 4, 5] = value
    x[1, :, 0, :] = value
    x[1, 7] = value  # a whole plane
    for ours, torchs in ((ours, torchs), _avg_pair("shufflenet")):
        with torch.inference_mode():
            got, exp = ours(x), torchs(x)
        assert torch.equal(got.isnan(), exp.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(exp))


def _train_max_pool(layer, base):
    x = base.clone().requires_grad_()
    y = layer(x)
    y.backward(torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape))
    return y, x.grad


@pytest.mark.parametrize("geometry,shape", _cases())
@pytest.mark.parametrize("values", ["ties", "nan"])
def test_max_pool_training_matches_nn_max_pool(geometry, shape, values):
    """The training path (forward on a channels-last copy, backward a scatter to its argmax
    indices) gives PyTorch's output and input gradient to the bit: ties (a ReLU's zeros)
    resolved to the same element, NaN winning its windows."""
    torch.manual_seed(0)
    base = torch.relu(torch.randn(shape))
    if values == "nan":
        base.view(-1)[::7] = float("nan")
    ours, torchs = _pair(geometry)
    got, got_grad = _train_max_pool(ours, base)
    exp, exp_grad = _train_max_pool(torchs, base)
    assert type(got.grad_fn).__name__ == "_MaxPoolChannelsLastForwardBackward"
    assert got.is_contiguous() and got_grad.is_contiguous()
    assert torch.equal(got.isnan(), exp.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(exp))
    assert torch.equal(got_grad, exp_grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_max_pool_training_dtypes_and_empty_batches(dtype):
    """float64 takes the training path too; bfloat16 (whose PyTorch backward adds in float)
    and an empty batch take PyTorch's. Either way the results are PyTorch's."""
    ours, torchs = _pair("resnet")
    base = torch.relu(torch.randn(2, 5, 11, 12)).to(dtype)
    (got, got_grad), (exp, exp_grad) = (_train_max_pool(layer, base) for layer in (ours, torchs))
    ours_path = type(got.grad_fn).__name__ == "_MaxPoolChannelsLastForwardBackward"
    assert ours_path == (dtype == torch.float64)
    assert torch.equal(got, exp) and torch.equal(got_grad, exp_grad)
    empty = torch.zeros(0, 5, 11, 12, dtype=dtype)
    (got, got_grad), (exp, exp_grad) = (_train_max_pool(layer, empty) for layer in (ours, torchs))
    assert got.shape == exp.shape and torch.equal(got_grad, exp_grad)


def test_max_pool_training_second_order():
    """The training path's backward is differentiable (a double backward, as F.max_pool2d's)."""
    ours, torchs = _pair("resnet")
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(ours, (x,))
    g = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for layer in (ours, torchs):
        (gx,) = torch.autograd.grad(layer(x), x, g, create_graph=True)
        results.append(torch.autograd.grad(gx.sum(), g))
    assert torch.equal(results[0][0], results[1][0])


@pytest.mark.parametrize("geometry,avg_geometry", [("resnet", "shufflenet"), ("ceil", "ceil")])
def test_training_path_is_pytorch_pool(geometry, avg_geometry):
    """With a gradient to record, the layers give PyTorch's output and input gradient (the
    max pool's ties broken the same way)."""
    base = torch.relu(torch.randn(2, 4, 13, 14))
    grads = []
    for layer in _pair(geometry) + _avg_pair(avg_geometry):
        x = base.clone().requires_grad_()
        y = layer(x)
        g = torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape)
        y.backward(g)
        grads.append((y.detach(), x.grad))
    for ours, torchs in (grads[:2], grads[2:]):
        assert torch.equal(ours[0], torchs[0]) and torch.equal(ours[1], torchs[1])


def test_other_layouts_and_indices():
    """Unbatched, channels-last and strided inputs, and return_indices, as nn.MaxPool2d."""
    x = torch.randn(2, 8, 10, 12)
    with torch.inference_mode():
        for ours, torchs in (_pair("resnet"), _avg_pair("shufflenet")):
            for t in (x[0], x.contiguous(memory_format=torch.channels_last), x[:, ::2]):
                assert torch.equal(ours(t), torchs(t))
    with_indices = MaxPool2d(3, 2, 1, return_indices=True)
    got = with_indices(x)
    exp = nn.MaxPool2d(3, 2, 1, return_indices=True)(x)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_is_a_drop_in_pytorch_pool(kind):
    ours, torchs = _pair("shufflenet") if kind == "max" else _avg_pair("shufflenet")
    assert isinstance(ours, type(torchs))
    assert ours.state_dict() == torchs.state_dict() == {}
    assert repr(ours) == repr(torchs)
    scripted = torch.jit.script(ours)
    x = torch.randn(1, 3, 9, 9)
    with torch.inference_mode():
        assert torch.equal(scripted(x), torchs(x))


def test_models_pool_through_them_and_the_reference_style_does_not():
    model = s_resnet50((0.5, 1.0), num_classes=10)
    assert type(model.maxpool) is MaxPool2d
    ref = reference_style(model)
    assert type(ref.maxpool) is nn.MaxPool2d
    assert (ref.maxpool.kernel_size, ref.maxpool.stride, ref.maxpool.padding) == (3, 2, 1)
    shufflenet = s_shufflenet((0.5, 1.0), num_classes=10)
    pools = [type(m) for m in shufflenet.modules() if isinstance(m, nn.AvgPool2d)]
    assert pools and set(pools) == {AvgPool2d}
    ref_pools = [type(m) for m in reference_style(shufflenet).modules()
                 if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d))]
    assert set(ref_pools) == {nn.AvgPool2d, nn.MaxPool2d}


def test_plain_is_the_same_pytorch_pool():
    ours = MaxPool2d((3, 2), (1, 2), (1, 0), 2, return_indices=True, ceil_mode=True)
    plain = ours.plain()
    assert type(plain) is nn.MaxPool2d and repr(plain) == repr(ours)
    avg = AvgPool2d((3, 2), (2, 1), (1, 0), True, False, 5)
    plain = avg.plain()
    assert type(plain) is nn.AvgPool2d and repr(plain) == repr(avg)
    assert plain.divisor_override == 5 and not plain.count_include_pad
