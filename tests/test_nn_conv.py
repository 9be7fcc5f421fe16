"""slimops.nn.SlimmableConv2d: a drop-in nn.Conv2d at one width, channel prefixes at many."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimops
from slimops.nn import SlimmableConv2d

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
WIDTHS = (0.25, 0.5, 1.0)


def hand_sliced(layer: SlimmableConv2d, x: torch.Tensor, weight=None, bias=None):
    """The layer at its active width, by hand: slice the (per-group) prefix, call F.conv2d."""
    weight = layer.weight if weight is None else weight
    bias = layer.bias if bias is None else bias
    cin, cout = layer.active_channels()
    geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    if layer.depthwise:
        b = None if bias is None else bias[:cin]
        return F.conv2d(x, weight[:cin], b, groups=cin, **geometry)
    g = layer.groups
    rows, og, ig = weight.shape[0] // g, cout // g, cin // g
    w = torch.cat([weight[i * rows: i * rows + og, :ig] for i in range(g)])
    b = None if bias is None else torch.cat([bias[i * rows: i * rows + og] for i in range(g)])
    return F.conv2d(x, w, b, groups=g, **geometry)


def active_mask(layer: SlimmableConv2d) -> torch.Tensor:
    """1 where the active width reads the weight, 0 elsewhere."""
    cin, cout = layer.active_channels()
    mask = torch.zeros_like(layer.weight, dtype=torch.bool)
    if layer.depthwise:
        mask[:cin] = True
        return mask
    g = layer.groups
    rows, og, ig = layer.weight.shape[0] // g, cout // g, cin // g
    for i in range(g):
        mask[i * rows: i * rows + og, :ig] = True
    return mask


# ------------------------------------------------------------ one width: exactly nn.Conv2d

SINGLE = [
    dict(in_channels=3, out_channels=5, kernel_size=1),
    dict(in_channels=3, out_channels=7, kernel_size=3, padding=1),
    dict(in_channels=7, out_channels=3, kernel_size=5, padding=2, bias=False),
    dict(in_channels=3, out_channels=13, kernel_size=3, stride=2),
    dict(in_channels=1, out_channels=7, kernel_size=3, stride=2, padding=1),
    dict(in_channels=3, out_channels=3, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    dict(in_channels=6, out_channels=2, kernel_size=3, groups=2, bias=False),
    dict(in_channels=7, out_channels=7, kernel_size=3, padding=1, groups=7),  # depthwise
    dict(in_channels=13, out_channels=13, kernel_size=5, stride=2, padding=2, groups=13,
         bias=False),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="same"),
    dict(in_channels=3, out_channels=5, kernel_size=5, padding="same", dilation=2),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
    dict(in_channels=3, out_channels=5, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
]


def _id(cfg):
    return "-".join(f"{k[:3]}{v}" for k, v in cfg.items()).replace(" ", "")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", SINGLE, ids=[_id(c) for c in SINGLE])
def test_single_width_is_nn_conv2d(cfg, dtype, tol):
    torch.manual_seed(123)
    ref = nn.Conv2d(**cfg, dtype=dtype)
    torch.manual_seed(123)
    slim = SlimmableConv2d(**cfg, dtype=dtype)
    assert isinstance(slim, nn.Conv2d)
    assert slim.widths == (1.0,)
    # same parameters, state_dict keys and initialization
    assert [(n, p.shape) for n, p in slim.named_parameters()] == [
        (n, p.shape) for n, p in ref.named_parameters()
    ]
    assert list(slim.state_dict().keys()) == list(ref.state_dict().keys())
    for (_, a), (_, b) in zip(slim.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # interchangeable state dicts
    slim.load_state_dict(ref.state_dict())
    ref.load_state_dict(slim.state_dict())

    x = torch.randn(2, cfg["in_channels"], 7, 9, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = slim(x), ref(x_ref)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **tol(dtype))
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))
    torch.testing.assert_close(slim.weight.grad, ref.weight.grad, **tol(dtype))
    if ref.bias is not None:
        torch.testing.assert_close(slim.bias.grad, ref.bias.grad, **tol(dtype))


# -------------------------------------------------------------------- several widths

# (in_channels, out_channels, groups, widths): dense, depthwise, grouped with fixed groups
DENSE = ([1, 7, 13], [3, 7, 13], 1, WIDTHS)
DENSE_DOWN = ([3, 7, 13], [7, 3, 1], 1, WIDTHS)  # per-width lists need not grow
DEPTHWISE = ([1, 3, 7, 13], [1, 3, 7, 13], 13, (0.1, 0.25, 0.5, 1.0))
GROUPED = ([3, 6, 12], [6, 9, 12], 3, WIDTHS)
GROUPED_ODD = ([3, 9, 15], [9, 3, 15], 3, WIDTHS)
LAYOUTS = {
    "dense": DENSE,
    "dense_down": DENSE_DOWN,
    "depthwise": DEPTHWISE,
    "grouped": GROUPED,
    "grouped_odd": GROUPED_ODD,
}


def make(layout, dtype=torch.float32, **kwargs):
    cin, cout, groups, widths = LAYOUTS[layout]
    kwargs.setdefault("kernel_size", 3)
    return SlimmableConv2d(cin, cout, groups=groups, widths=widths, dtype=dtype, **kwargs)


def test_layout_detection():
    assert make("depthwise").depthwise
    assert not make("dense").depthwise
    assert not make("grouped").depthwise
    assert make("grouped").groups == 3
    layer = make("grouped")
    assert layer.weight.shape == (12, 4, 3, 3)
    layer = make("depthwise")
    assert layer.weight.shape == (13, 1, 3, 3)
    assert make("dense").weight.shape == (13, 13, 3, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "geometry",
    [dict(), dict(padding=1), dict(stride=2, padding=1), dict(padding=2, dilation=2),
     dict(kernel_size=1), dict(kernel_size=5, stride=2)],
    ids=["k3", "k3p1", "k3s2", "k3d2", "k1", "k5s2"],
)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_width_matches_reference(layout, geometry, bias, dtype, tol):
    layer = make(layout, dtype, bias=bias, **geometry)
    n_widths = len(layer.widths)
    x_full = torch.randn(2, max(layer.in_channels_list), 7, 9, dtype=dtype)
    for i, w in enumerate(layer.widths):
        slimops.set_width(layer, w)
        cin, cout = layer.in_channels_list[i], layer.out_channels_list[i]
        x = x_full[:, :cin].contiguous()
        y = layer(x)
        assert y.shape[:2] == (2, cout)
        torch.testing.assert_close(y, hand_sliced(layer, x), **tol(dtype))
        # and the oracle of the op layer, on the full shared weight
        if layer.depthwise:
            oracle = slimops.reference.depthwise_conv2d(
                x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
        else:
            oracle = slimops.reference.conv2d(
                x, layer.weight, layer.bias, cout, layer.stride, layer.padding,
                layer.dilation, layer.groups)
        torch.testing.assert_close(y, oracle, **tol(dtype))
    assert n_widths == len(layer.widths)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scoped_width_matches_set_width(layout):
    layer = make(layout, padding=1)
    x_full = torch.randn(1, max(layer.in_channels_list), 5, 5)
    for i, w in enumerate(layer.widths):
        x = x_full[:, : layer.in_channels_list[i]]
        with slimops.width(layer, w):
            scoped = layer(x)
        slimops.set_width(layer, w)
        torch.testing.assert_close(scoped, layer(x), rtol=0, atol=0)
        slimops.set_width(layer, layer.widths[-1])


def test_full_width_grouped_is_nn_conv2d(tol):
    layer = make("grouped", padding=1)
    ref = nn.Conv2d(12, 12, 3, padding=1, groups=3)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 12, 6, 5)
    torch.testing.assert_close(layer(x), ref(x), **tol(torch.float32))


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_at_each_width(layout, dtype, tol):
    layer = make(layout, dtype, padding=1, stride=2)
    x_full = torch.randn(3, max(layer.in_channels_list), 7, 7, dtype=dtype)
    for i, w in enumerate(layer.widths):
        slimops.set_width(layer, w)
        layer.zero_grad(set_to_none=True)
        x = x_full[:, : layer.in_channels_list[i]].clone().requires_grad_()
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
        # zero outside the active (per-group) prefix, non-zero inside
        mask = active_mask(layer)
        assert layer.weight.grad.shape == layer.weight.shape
        assert torch.all(layer.weight.grad[~mask] == 0)
        assert torch.all(layer.weight.grad[mask].abs().sum() > 0)
        bias_mask = mask.flatten(1).any(1)
        assert torch.all(layer.bias.grad[~bias_mask] == 0)


@pytest.mark.parametrize("layout", ["dense", "depthwise", "grouped"])
def test_gradcheck(layout):
    layer = make(layout, torch.float64, padding=1)
    slimops.set_width(layer, 0.5)
    cin, _ = layer.active_channels()
    x = torch.randn(2, cin, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, weight, bias))


def test_accumulates_gradients_across_widths(tol):
    layer = make("dense", torch.float64, padding=1)
    x_full = torch.randn(2, 13, 5, 5, dtype=torch.float64)
    weight = layer.weight.detach().clone().requires_grad_()
    for i, w in enumerate(layer.widths):  # the sandwich rule: one backward per width
        slimops.set_width(layer, w)
        x = x_full[:, : layer.in_channels_list[i]]
        layer(x).square().sum().backward()
        hand_sliced(layer, x, weight, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, weight.grad, **tol(torch.float64))


# ------------------------------------------------------------------------------- inputs


def test_wrong_channel_count():
    layer = make("dense", padding=1)
    slimops.set_width(layer, 0.5)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(1, 13, 5, 5))
    msg = str(info.value)
    assert "SlimmableConv2d" in msg
    assert "at width 0.5" in msg and "expects 7" in msg and "got 13" in msg
    assert "(0.25, 0.5, 1.0)" in msg
    for c in (1, 6, 8):
        with pytest.raises(ValueError, match="expects 7"):
            layer(torch.randn(1, c, 5, 5))


@pytest.mark.parametrize("layout", ["dense", "depthwise", "grouped"])
def test_wrong_dtype(layout):
    layer = make(layout, torch.float32)
    c = layer.active_channels()[0]
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(1, c, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.ones(1, c, 5, 5, dtype=torch.int64))
    with pytest.raises(TypeError):
        layer(torch.randn(1, c, 5, 5).numpy())


@pytest.mark.parametrize("shape", [(13, 5, 5), (1, 1, 13, 5, 5), (13,)])
def test_wrong_rank(shape):
    layer = make("dense")
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(*shape))


def test_input_too_small():
    layer = make("dense", kernel_size=5)
    with pytest.raises(ValueError, match="too small"):
        layer(torch.randn(1, 13, 3, 7))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_other_than_zeros(mode):
    with pytest.raises(ValueError, match="padding_mode"):
        SlimmableConv2d(3, 4, 3, padding=1, padding_mode=mode)
    with pytest.raises(ValueError, match="padding_mode"):
        SlimmableConv2d([1, 3], [2, 4], 3, padding=1, padding_mode=mode, widths=(0.5, 1.0))


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible"):
        SlimmableConv2d([3, 6], [6, 9], 3, groups=2, widths=(0.5, 1.0))
    with pytest.raises(ValueError, match="widths="):
        SlimmableConv2d([3, 6], [6, 9], 3)
    with pytest.raises(ValueError, match="2 channel counts for 3 widths"):
        SlimmableConv2d([3, 6], [6, 9], 3, widths=WIDTHS)
    with pytest.raises(ValueError, match="positive"):
        SlimmableConv2d([0, 6], [6, 9], 3, widths=(0.5, 1.0))
    with pytest.raises(ValueError, match="odd effective kernel"):
        SlimmableConv2d(3, 4, 4, padding="same")
    with pytest.raises(ValueError, match="distinct positive"):
        SlimmableConv2d([3, 6], [6, 9], 3, widths=(1.0, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["dense", "depthwise", "grouped"])
def test_empty_batch(layout, dtype):
    layer = make(layout, dtype, stride=2, padding=1)
    slimops.set_width(layer, 0.5)
    cin, cout = layer.active_channels()
    x = torch.randn(0, cin, 7, 5, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, cout, 4, 3)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert layer.weight.grad is not None
    assert torch.all(layer.weight.grad == 0)
    assert torch.all(layer.bias.grad == 0)


def _noncontiguous_inputs(n, c, h, w, dtype):
    yield "transposed", torch.randn(n, c, w, h, dtype=dtype).transpose(2, 3)
    yield "channel_slice", torch.randn(n, 2 * c + 1, h, w, dtype=dtype)[:, 1::2]
    yield "channel_offset", torch.randn(n, c + 3, h, w, dtype=dtype)[:, 3:]
    yield "spatial_stride", torch.randn(n, c, h, 2 * w, dtype=dtype)[..., ::2]
    yield "batch_permuted", torch.randn(c, n, h, w, dtype=dtype).transpose(0, 1)
    yield "expanded", torch.randn(1, c, h, w, dtype=dtype).expand(n, c, h, w)
    yield "channels_last", torch.randn(n, c, h, w, dtype=dtype).to(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["dense", "depthwise", "grouped"])
def test_noncontiguous_and_channels_last_input(layout, dtype, tol):
    layer = make(layout, dtype, padding=1, stride=2)
    for w in layer.widths:
        slimops.set_width(layer, w)
        cin, _ = layer.active_channels()
        for name, x in _noncontiguous_inputs(2, cin, 7, 5, dtype):
            x = x.detach().requires_grad_()
            y = layer(x)
            x_ref = x.detach().contiguous().requires_grad_()
            y_ref = hand_sliced(layer, x_ref)
            torch.testing.assert_close(y, y_ref, **tol(dtype), msg=lambda m: f"{name}: {m}")
            g = torch.randn_like(y_ref)
            y.backward(g)
            y_ref.backward(g)
            torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype),
                                       msg=lambda m: f"{name}: {m}")


# Compiled kernels need a contiguous shared weight; any other layout (here channels_last
# after `layer.to(memory_format=...)`, which nn.Conv2d supports) must still give the right
# result (the op falls back to the reference path, with a one-time warning).
@pytest.mark.filterwarnings("ignore:.*shared weight is not contiguous:RuntimeWarning")
@pytest.mark.parametrize("layout", ["dense", "depthwise", "grouped"])
def test_channels_last_weight(layout, tol):
    layer = make(layout, torch.float64, padding=1)
    x_full = torch.randn(2, max(layer.in_channels_list), 6, 5, dtype=torch.float64)
    expected = {}
    for w in layer.widths:
        slimops.set_width(layer, w)
        expected[w] = layer(x_full[:, : layer.active_channels()[0]])
    layer = layer.to(memory_format=torch.channels_last)
    for w in layer.widths:
        slimops.set_width(layer, w)
        x = x_full[:, : layer.active_channels()[0]].to(memory_format=torch.channels_last)
        torch.testing.assert_close(layer(x), expected[w], **tol(torch.float64))


def test_no_grad_and_inference_mode(tol):
    layer = make("dense", padding=1)
    slimops.set_width(layer, 0.5)
    x = torch.randn(2, 7, 5, 5)
    expected = hand_sliced(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, **tol(torch.float32))
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected.detach(), **tol(torch.float32))


def test_forward_does_not_touch_the_weight():
    layer = make("grouped", padding=1)
    before = layer.weight.detach().clone()
    ptr = layer.weight.data_ptr()
    for w in layer.widths:
        slimops.set_width(layer, w)
        layer(torch.randn(1, layer.active_channels()[0], 4, 4)).sum().backward()
    assert layer.weight.data_ptr() == ptr
    torch.testing.assert_close(layer.weight.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "cin, cout, groups",
    [([9, 18, 27, 36], [12, 24, 36, 48], 1), ([9, 18, 27, 36], [9, 18, 27, 36], 36),
     ([12, 24, 36, 48], [8, 20, 32, 44], 4)],
    ids=["dense", "depthwise", "grouped"],
)
def test_medium_shapes(cin, cout, groups, stride, tol):
    """Sizes past any kernel's block/vector width, with ragged tails."""
    widths = (0.25, 0.5, 0.75, 1.0)
    layer = SlimmableConv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, widths=widths)
    x_full = torch.randn(3, max(cin), 19, 37)
    for i, w in enumerate(widths):
        slimops.set_width(layer, w)
        layer.zero_grad(set_to_none=True)
        x = x_full[:, : cin[i]].clone().requires_grad_()
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


# ------------------------------------------------------ widths between the listed ones

RULE_LAYOUTS = {  # (in rule, out rule, groups): counts int(c * w) at any width
    "dense": (13, 11, 1),
    "depthwise": (13, 13, 13),
    "fixed_in": (3, 16, 1),  # an int: the stem's image channels never slim
}


def make_any(layout, dtype=torch.float64, **kwargs):
    from slimops.width import ChannelRule

    cin, cout, groups = RULE_LAYOUTS[layout]
    rin = cin if layout == "fixed_in" else ChannelRule(cin)
    return SlimmableConv2d(rin, ChannelRule(cout), 3, groups=groups, widths=WIDTHS,
                           dtype=dtype, **kwargs)


@pytest.mark.parametrize("w", [0.3, 0.61, 0.999])
@pytest.mark.parametrize("layout", list(RULE_LAYOUTS))
def test_in_between_width_matches_reference(layout, w, tol):
    layer = make_any(layout, padding=1, stride=2, bias=True)
    assert layer.any_width
    cin, cout, _ = RULE_LAYOUTS[layout]
    slimops.set_width(layer, w)
    expected = (cin if layout == "fixed_in" else int(cin * w), int(cout * w))
    assert layer.active_channels() == expected and layer.width_index() is None
    x = torch.randn(2, expected[0], 7, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, hand_sliced(layer, x), **tol(torch.float64))
    y.square().sum().backward()
    assert (layer.weight.grad != 0).eq(active_mask(layer)).all()  # only the prefix


def test_in_between_width_shape_errors():
    from slimops.width import ChannelRule

    layer = SlimmableConv2d(ChannelRule(12), ChannelRule(12), 1, groups=3, widths=WIDTHS)
    slimops.set_width(layer, 0.5)  # listed: 6 channels, divisible by 3
    slimops.set_width(layer, 0.6)  # int(12 * 0.6) = 7: not
    with pytest.raises(ValueError, match=r"at width 0\.6 .*\(7, 7\), not divisible by groups=3"):
        layer(torch.randn(1, 7, 4, 4))
    odd = SlimmableConv2d(ChannelRule(8), ChannelRule(8, divisor=2), 3, groups=8, widths=WIDTHS)
    assert odd.depthwise  # equal at the listed widths, not in between
    slimops.set_width(odd, 0.45)
    with pytest.raises(ValueError, match="depthwise.*3 inputs but 4 outputs"):
        odd.active_channels()
