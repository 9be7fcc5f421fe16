"""slimops.nn.SlimmableLinear: a drop-in nn.Linear at one width, feature prefixes at many."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimops
from slimops.nn import SlimmableLinear

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
WIDTHS = (0.25, 0.5, 1.0)

# (in_features, out_features, widths)
LAYOUTS = {
    "grow": ([1, 7, 13], [3, 7, 13], WIDTHS),
    "shrink": ([3, 7, 13], [13, 3, 1], WIDTHS),
    "classifier": ([3, 7, 13], 10, WIDTHS),  # fixed out_features
    "four": ([1, 3, 7, 13], [1, 3, 7, 13], (0.1, 0.25, 0.5, 1.0)),
}


def make(layout, dtype=torch.float32, bias=True):
    fin, fout, widths = LAYOUTS[layout]
    return SlimmableLinear(fin, fout, bias=bias, widths=widths, dtype=dtype)


def hand_sliced(layer, x, weight=None, bias=None):
    weight = layer.weight if weight is None else weight
    bias = layer.bias if bias is None else bias
    fin, fout = layer.active_features()
    return F.linear(x, weight[:fout, :fin], None if bias is None else bias[:fout])


# --------------------------------------------------------------- one width: nn.Linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("features", [(1, 1), (3, 7), (13, 3), (7, 13)])
def test_single_width_is_nn_linear(features, bias, dtype, tol):
    fin, fout = features
    torch.manual_seed(7)
    ref = nn.Linear(fin, fout, bias=bias, dtype=dtype)
    torch.manual_seed(7)
    slim = SlimmableLinear(fin, fout, bias=bias, dtype=dtype)
    assert isinstance(slim, nn.Linear)
    assert slim.widths == (1.0,)
    assert [(n, p.shape) for n, p in slim.named_parameters()] == [
        (n, p.shape) for n, p in ref.named_parameters()
    ]
    assert list(slim.state_dict().keys()) == list(ref.state_dict().keys())
    for a, b in zip(slim.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    slim.load_state_dict(ref.state_dict())

    for shape in [(5, fin), (2, 3, fin), (fin,), (2, 1, 3, fin)]:
        x = torch.randn(*shape, dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = slim(x), ref(x_ref)
        assert y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref, **tol(dtype))
        g = torch.randn_like(y)
        slim.zero_grad()
        ref.zero_grad()
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))
        torch.testing.assert_close(slim.weight.grad, ref.weight.grad, **tol(dtype))
        if bias:
            torch.testing.assert_close(slim.bias.grad, ref.bias.grad, **tol(dtype))


# --------------------------------------------------------------------- several widths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_width_matches_reference(layout, bias, dtype, tol):
    layer = make(layout, dtype, bias)
    x_full = torch.randn(5, max(layer.in_features_list), dtype=dtype)
    for i, w in enumerate(layer.widths):
        slimops.set_width(layer, w)
        fin, fout = layer.in_features_list[i], layer.out_features_list[i]
        assert layer.active_features() == (fin, fout)
        x = x_full[:, :fin]
        y = layer(x)
        assert y.shape == (5, fout)
        torch.testing.assert_close(y, hand_sliced(layer, x), **tol(dtype))
        oracle = slimops.reference.linear(x, layer.weight, layer.bias, fout)
        torch.testing.assert_close(y, oracle, **tol(dtype))


def test_classifier_keeps_its_outputs(tol):
    layer = make("classifier")
    assert layer.out_features_list == [10, 10, 10]
    for i, w in enumerate(layer.widths):
        with slimops.width(layer, w):
            x = torch.randn(4, layer.in_features_list[i])
            y = layer(x)
            assert y.shape == (4, 10)
            torch.testing.assert_close(y, F.linear(x, layer.weight[:, : x.shape[1]], layer.bias),
                                       **tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3), (2, 1, 3), (1, 4), ()], ids=str)
@pytest.mark.parametrize("layout", ["grow", "classifier"])
def test_leading_dims(layout, shape, dtype, tol):
    """[B, T, F] inputs (and any other leading shape, or none) as nn.Linear."""
    layer = make(layout, dtype)
    for w in layer.widths:
        slimops.set_width(layer, w)
        fin, fout = layer.active_features()
        x = torch.randn(*shape, fin, dtype=dtype, requires_grad=True)
        y = layer(x)
        assert y.shape == (*shape, fout)
        x_ref = x.detach().clone().requires_grad_()
        y_ref = hand_sliced(layer, x_ref)
        torch.testing.assert_close(y, y_ref, **tol(dtype))
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_at_each_width(layout, dtype, tol):
    layer = make(layout, dtype)
    x_full = torch.randn(2, 3, max(layer.in_features_list), dtype=dtype)
    for w in layer.widths:
        slimops.set_width(layer, w)
        layer.zero_grad(set_to_none=True)
        fin, fout = layer.active_features()
        x = x_full[..., :fin].clone().requires_grad_()
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        weight = layer.weight.detach().clone().requires_grad_()
        bias = layer.bias.detach().clone().requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        hand_sliced(layer, x_ref, weight, bias).backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))
        torch.testing.assert_close(layer.weight.grad, weight.grad, **tol(dtype))
        torch.testing.assert_close(layer.bias.grad, bias.grad, **tol(dtype))
        # zero outside the active prefix, non-zero inside
        assert torch.all(layer.weight.grad[fout:] == 0)
        assert torch.all(layer.weight.grad[:, fin:] == 0)
        assert layer.weight.grad[:fout, :fin].abs().sum() > 0
        assert torch.all(layer.bias.grad[fout:] == 0)


def test_gradcheck():
    layer = make("grow", torch.float64)
    slimops.set_width(layer, 0.5)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, weight, bias))


# ------------------------------------------------------------------------------- inputs


def test_wrong_feature_count():
    layer = make("grow")
    slimops.set_width(layer, 0.25)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(2, 7))
    msg = str(info.value)
    assert "SlimmableLinear" in msg
    assert "at width 0.25" in msg and "expects 1" in msg and "got 7" in msg
    assert "(0.25, 0.5, 1.0)" in msg
    with pytest.raises(ValueError, match="expects 1"):
        layer(torch.randn(2, 3, 13))


def test_wrong_dtype():
    layer = make("grow", torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 13, dtype=torch.float32))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.ones(2, 13, dtype=torch.int64))
    with pytest.raises(TypeError):
        layer([1.0] * 13)


def test_scalar_input():
    layer = make("grow")
    with pytest.raises(ValueError):
        layer(torch.tensor(1.0))


def test_constructor_errors():
    with pytest.raises(ValueError, match="widths="):
        SlimmableLinear([3, 6], [6, 9])
    with pytest.raises(ValueError, match="2 channel counts for 3 widths"):
        SlimmableLinear([3, 6], 4, widths=WIDTHS)
    with pytest.raises(ValueError, match="positive"):
        SlimmableLinear([3, 6], [0, 9], widths=(0.5, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0)], ids=str)
def test_empty_batch(shape, dtype):
    layer = make("grow", dtype)
    slimops.set_width(layer, 0.5)
    x = torch.randn(*shape, 7, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert layer.weight.grad is not None and torch.all(layer.weight.grad == 0)
    assert torch.all(layer.bias.grad == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_input(dtype, tol):
    layer = make("grow", dtype)
    for w in layer.widths:
        slimops.set_width(layer, w)
        fin, _ = layer.active_features()
        inputs = {
            "transposed": torch.randn(fin, 5, dtype=dtype).t(),
            "feature_stride": torch.randn(5, 2 * fin, dtype=dtype)[:, ::2],
            "feature_offset": torch.randn(5, fin + 3, dtype=dtype)[:, 3:],
            "btf_permuted": torch.randn(4, 2, fin, dtype=dtype).transpose(0, 1),
            "expanded": torch.randn(1, fin, dtype=dtype).expand(4, fin),
            "last_dim_stride0": torch.randn(3, 1, dtype=dtype).expand(3, fin),
        }
        for name, x in inputs.items():
            x = x.detach().requires_grad_()
            x_ref = x.detach().contiguous().requires_grad_()
            y, y_ref = layer(x), hand_sliced(layer, x_ref)
            torch.testing.assert_close(y, y_ref, **tol(dtype), msg=lambda m: f"{name}: {m}")
            g = torch.randn_like(y_ref)
            y.backward(g)
            y_ref.backward(g)
            torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype),
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:.*shared weight is not contiguous:RuntimeWarning")
def test_transposed_weight(tol):
    """A weight that is a non-contiguous view (e.g. tied to another layer's transpose)."""
    layer = make("grow", torch.float64)
    x_full = torch.randn(3, 13, dtype=torch.float64)
    expected = {}
    for w in layer.widths:
        slimops.set_width(layer, w)
        expected[w] = layer(x_full[:, : layer.active_features()[0]]).detach()
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t())
    assert not layer.weight.is_contiguous()
    for w in layer.widths:
        slimops.set_width(layer, w)
        y = layer(x_full[:, : layer.active_features()[0]])
        torch.testing.assert_close(y, expected[w], **tol(torch.float64))


def test_medium_shapes(tol):
    """Sizes past any kernel's block/vector width, with ragged tails."""
    widths = (0.25, 0.5, 0.75, 1.0)
    layer = SlimmableLinear([17, 34, 51, 67], [11, 23, 34, 45], widths=widths)
    x_full = torch.randn(5, 7, 67)
    for i, w in enumerate(widths):
        slimops.set_width(layer, w)
        layer.zero_grad(set_to_none=True)
        fin, fout = layer.active_features()
        x = x_full[..., :fin].clone().requires_grad_()
        y = layer(x)
        x_ref = x.detach().clone().requires_grad_()
        weight = layer.weight.detach().clone().requires_grad_()
        y_ref = hand_sliced(layer, x_ref, weight)
        torch.testing.assert_close(y, y_ref, **tol(torch.float32, y_ref))
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol(torch.float32, x_ref.grad))
        torch.testing.assert_close(layer.weight.grad, weight.grad,
                                   **tol(torch.float32, weight.grad))


@pytest.mark.parametrize("w", [0.3, 0.7])
def test_in_between_width_matches_reference(w, tol):
    from slimops.width import ChannelRule

    layer = SlimmableLinear(ChannelRule(20), 10, widths=WIDTHS, dtype=torch.float64)
    assert layer.any_width
    with slimops.width(layer, w):
        assert layer.active_features() == (int(20 * w), 10)
        x = torch.randn(3, int(20 * w), dtype=torch.float64)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight[:, :int(20 * w)],
                                                      layer.bias), **tol(torch.float64))
    listed = SlimmableLinear([5, 10, 20], 10, widths=WIDTHS)
    with pytest.raises(ValueError, match="unknown width 0.3"):
        slimops.set_width(listed, 0.3)
