"""slimops.nn.SwitchableBatchNorm2d: private γ/β/running stats per width (S-BN)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimops
from slimops.nn import SwitchableBatchNorm2d

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
WIDTHS = (0.25, 0.5, 1.0)
FEATURES = [3, 7, 13]


def make(dtype=torch.float32, randomize=True, **kwargs):
    sbn = SwitchableBatchNorm2d(FEATURES, widths=WIDTHS, dtype=dtype, **kwargs)
    if randomize:
        with torch.no_grad():
            for bn in sbn.bn:
                if bn.affine:
                    bn.weight.uniform_(0.5, 2.0)
                    bn.bias.normal_()
                if bn.track_running_stats:
                    bn.running_mean.normal_()
                    bn.running_var.uniform_(0.5, 2.0)
    return sbn


def snapshot(sbn):
    return {k: v.detach().clone() for k, v in sbn.state_dict().items()}


def plain_copy(sbn, i):
    """An nn.BatchNorm2d with width ``i``'s configuration, parameters and statistics."""
    return copy.deepcopy(sbn.bn[i])


def test_layout_and_state_dict_keys():
    sbn = make(randomize=False)
    assert len(sbn.bn) == 3
    assert all(type(bn) is nn.BatchNorm2d for bn in sbn.bn)
    assert [bn.num_features for bn in sbn.bn] == FEATURES
    expected = []
    for i in range(3):
        expected += [f"bn.{i}.{k}" for k in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    assert list(sbn.state_dict().keys()) == expected


def test_single_width_with_an_int():
    sbn = SwitchableBatchNorm2d(5)
    assert sbn.widths == (1.0,)
    assert len(sbn.bn) == 1 and sbn.bn[0].num_features == 5
    sbn2 = SwitchableBatchNorm2d(5, widths=WIDTHS)
    assert [bn.num_features for bn in sbn2.bn] == [5, 5, 5]


def test_active_bn_follows_the_width():
    sbn = make()
    for i, w in enumerate(WIDTHS):
        slimops.set_width(sbn, w)
        assert sbn.active_bn() is sbn.bn[i]
        with slimops.width(sbn, WIDTHS[(i + 1) % 3]):
            assert sbn.active_bn() is sbn.bn[(i + 1) % 3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_training_updates_only_the_active_width(momentum, dtype, tol):
    sbn = make(dtype, momentum=momentum).train()
    plain = [plain_copy(sbn, i).train() for i in range(3)]
    # several steps, visiting the widths in an irregular order
    for step, i in enumerate([2, 0, 0, 1, 2, 0]):
        before = snapshot(sbn)
        sbn.zero_grad(set_to_none=True)
        for bn in plain:
            bn.zero_grad(set_to_none=True)
        slimops.set_width(sbn, WIDTHS[i])
        x = torch.randn(4, FEATURES[i], 5, 3, dtype=dtype) * 3 + step
        x_ref = x.detach().clone().requires_grad_()
        x = x.requires_grad_()
        y, y_ref = sbn(x), plain[i](x_ref)
        torch.testing.assert_close(y, y_ref, **tol(dtype))
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))
        torch.testing.assert_close(sbn.bn[i].weight.grad, plain[i].weight.grad, **tol(dtype))
        torch.testing.assert_close(sbn.bn[i].bias.grad, plain[i].bias.grad, **tol(dtype))
        # no gradient reaches the other widths' γ and β
        assert all(sbn.bn[j].weight.grad is None for j in range(3) if j != i)
        after = sbn.state_dict()
        for k, v in after.items():
            j = int(k.split(".")[1])
            if j != i or k.endswith(("weight", "bias")):
                torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
        key = f"bn.{i}.num_batches_tracked"
        assert int(after[key]) == int(before[key]) + 1
        assert not torch.equal(after[f"bn.{i}.running_mean"], before[f"bn.{i}.running_mean"])
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(sbn.bn[i], name), getattr(plain[i], name),
                                       **tol(dtype), msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_uses_the_width_stats(dtype, tol):
    sbn = make(dtype).eval()
    before = snapshot(sbn)
    for i, w in enumerate(WIDTHS):
        slimops.set_width(sbn, w)
        bn = sbn.bn[i]
        x = torch.randn(3, FEATURES[i], 4, 5, dtype=dtype)
        expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                                0.0, bn.eps)
        torch.testing.assert_close(sbn(x), expected, **tol(dtype))
        torch.testing.assert_close(sbn(x), plain_copy(sbn, i).eval()(x), **tol(dtype))
        # a single value per channel is fine in eval mode
        x1 = torch.randn(1, FEATURES[i], 1, 1, dtype=dtype)
        torch.testing.assert_close(sbn(x1), plain_copy(sbn, i).eval()(x1), **tol(dtype))
    for k, v in sbn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_gradients(dtype, tol):
    sbn = make(dtype).eval()
    slimops.set_width(sbn, 0.5)
    plain = plain_copy(sbn, 1).eval()
    x = torch.randn(2, 7, 3, 3, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 7, 3, 3, dtype=dtype)
    sbn(x).backward(g)
    plain(x_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))
    torch.testing.assert_close(sbn.bn[1].weight.grad, plain.weight.grad, **tol(dtype))
    torch.testing.assert_close(sbn.bn[1].bias.grad, plain.bias.grad, **tol(dtype))
    assert sbn.bn[0].weight.grad is None and sbn.bn[2].weight.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_no_running_stats(train, dtype, tol):
    sbn = make(dtype, track_running_stats=False).train(train)
    assert all(bn.running_mean is None for bn in sbn.bn)
    for i, w in enumerate(WIDTHS):
        slimops.set_width(sbn, w)
        plain = plain_copy(sbn, i).train(train)
        x = torch.randn(4, FEATURES[i], 3, 5, dtype=dtype) * 2 - 1
        y = sbn(x)
        torch.testing.assert_close(y, plain(x), **tol(dtype))
        # batch statistics in both modes
        expected = F.batch_norm(x, None, None, sbn.bn[i].weight, sbn.bn[i].bias, True, 0.1,
                                sbn.bn[i].eps)
        torch.testing.assert_close(y, expected, **tol(dtype))
    assert list(sbn.state_dict().keys()) == [
        f"bn.{i}.{k}" for i in range(3) for k in ("weight", "bias")
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_affine_false(train, dtype, tol):
    sbn = make(dtype, affine=False).train(train)
    for i, w in enumerate(WIDTHS):
        slimops.set_width(sbn, w)
        plain = plain_copy(sbn, i).train(train)
        x = torch.randn(3, FEATURES[i], 4, 4, dtype=dtype)
        torch.testing.assert_close(sbn(x), plain(x), **tol(dtype))
        torch.testing.assert_close(sbn.bn[i].running_mean, plain.running_mean, **tol(dtype))
        torch.testing.assert_close(sbn.bn[i].running_var, plain.running_var, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_scale_shift_is_the_bn_affine(affine, dtype, tol):
    sbn = make(dtype, affine=affine).eval()
    for i, w in enumerate(WIDTHS):
        slimops.set_width(sbn, w)
        scale, shift = sbn.eval_scale_shift()
        assert scale.shape == shift.shape == (FEATURES[i],)
        bn = sbn.bn[i]
        expected_scale = 1 / torch.sqrt(bn.running_var + bn.eps)
        expected_shift = -bn.running_mean * expected_scale
        if affine:
            expected_scale = expected_scale * bn.weight
            inv_std = 1 / torch.sqrt(bn.running_var + bn.eps)
            expected_shift = bn.bias - bn.running_mean * inv_std * bn.weight
        torch.testing.assert_close(scale, expected_scale, **tol(dtype))
        torch.testing.assert_close(shift, expected_shift, **tol(dtype))
        x = torch.randn(2, FEATURES[i], 3, 3, dtype=dtype)
        torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), sbn(x),
                                   **tol(dtype))


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_normalize_with_residual_and_activation(train, activation, tol):
    dtype = torch.float64
    sbn = make(dtype).train(train)
    acts = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6}
    for i, w in enumerate(WIDTHS):
        slimops.set_width(sbn, w)
        plain = plain_copy(sbn, i).train(train)
        x = torch.randn(3, FEATURES[i], 4, 4, dtype=dtype) * 4
        r = torch.randn_like(x) * 4
        y = sbn.normalize(x, r, activation)
        torch.testing.assert_close(y, acts[activation](plain(x) + r), **tol(dtype))
        torch.testing.assert_close(sbn.bn[i].running_mean, plain.running_mean, **tol(dtype))
    with pytest.raises(ValueError, match="activation"):
        sbn.normalize(torch.randn(3, 13, 2, 2, dtype=dtype), None, "gelu")
    with pytest.raises(ValueError, match="residual"):  # would broadcast: refused
        sbn.normalize(torch.randn(3, 13, 2, 2, dtype=dtype), torch.randn(3, 13, 1, 1,
                                                                         dtype=dtype))


def test_training_needs_more_than_one_value_per_channel():
    sbn = make().train()
    slimops.set_width(sbn, 0.5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sbn(torch.randn(1, 7, 1, 1))
    # two values are enough
    assert sbn(torch.randn(2, 7, 1, 1)).shape == (2, 7, 1, 1)
    assert sbn(torch.randn(1, 7, 2, 1)).shape == (1, 7, 2, 1)


def test_wrong_input():
    sbn = make()
    slimops.set_width(sbn, 0.5)
    with pytest.raises(ValueError) as info:
        sbn(torch.randn(2, 13, 3, 3))
    msg = str(info.value)
    assert "at width 0.5" in msg and "expects 7" in msg and "(0.25, 0.5, 1.0)" in msg
    with pytest.raises(TypeError, match="dtype"):
        sbn(torch.randn(2, 7, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="4-D"):
        sbn(torch.randn(2, 7, 3))


def test_constructor_errors():
    with pytest.raises(ValueError, match="widths="):
        SwitchableBatchNorm2d([3, 6])
    with pytest.raises(ValueError, match="2 channel counts for 3 widths"):
        SwitchableBatchNorm2d([3, 6], widths=WIDTHS)


def test_noncontiguous_input(tol):
    dtype = torch.float64
    for train in (True, False):
        sbn = make(dtype).train(train)
        slimops.set_width(sbn, 0.5)
        plain = plain_copy(sbn, 1).train(train)
        for x in (torch.randn(3, 7, 5, 4, dtype=dtype).transpose(2, 3),
                  torch.randn(3, 9, 4, 5, dtype=dtype)[:, 2:],
                  torch.randn(3, 7, 4, 5, dtype=dtype).to(memory_format=torch.channels_last)):
            torch.testing.assert_close(sbn(x), plain(x.contiguous()), **tol(dtype))
            torch.testing.assert_close(sbn.bn[1].running_var, plain.running_var, **tol(dtype))


# ------------------------------------------------------------ shared BN (naive baseline)


def test_shared_bn_uses_prefixes_of_one_bn():
    """shared=True: one BN sized for the largest width; width w normalises with the prefix of
    its γ, β and running stats, and training at w updates only that prefix."""
    from slimops.nn import SwitchableBatchNorm2d

    m = SwitchableBatchNorm2d([2, 4], widths=(0.5, 1.0), shared=True)
    assert len(m.bn) == 1 and m.bn[0].num_features == 4
    with torch.no_grad():
        m.bn[0].weight.uniform_(0.5, 2.0)
        m.bn[0].bias.normal_()
    x = torch.randn(3, 2, 5, 5)
    before = m.bn[0].running_mean.clone()
    slimops.set_width(m, 0.5)
    y = m(x)
    ref_mean, ref_var = before[:2].clone(), torch.ones(2)
    ref = torch.nn.functional.batch_norm(x, ref_mean, ref_var, m.bn[0].weight[:2],
                                         m.bn[0].bias[:2], True, 0.1, 1e-5)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(m.bn[0].running_mean[:2], ref_mean)
    torch.testing.assert_close(m.bn[0].running_mean[2:], before[2:])
    m.eval()
    scale, shift = m.eval_scale_shift()
    assert scale.shape == (2,) and shift.shape == (2,)
    torch.testing.assert_close(m(x), x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))


# ------------------------------------------------------ widths between the listed ones


def make_any(dtype=torch.float64):
    """S-BN over a rule (8 channels at 1.0x, int(8 * w)): runs at any width in between."""
    from slimops.width import ChannelRule

    sbn = SwitchableBatchNorm2d(ChannelRule(8), widths=(0.25, 0.5, 1.0), dtype=dtype)
    with torch.no_grad():
        for bn in sbn.bn:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return sbn


@pytest.mark.parametrize("w, channels, affine_index", [(0.3, 2, 1), (0.5, 4, 1), (0.6, 4, 2),
                                                        (0.99, 7, 2)])
def test_in_between_width_trains_on_batch_stats_with_the_next_larger_affine(
        w, channels, affine_index, tol):
    sbn = make_any().train()
    assert sbn.any_width and sbn.num_features_list == [2, 4, 8]
    before = snapshot(sbn)
    x = torch.randn(3, channels, 5, 5, dtype=torch.float64, requires_grad=True)
    with slimops.width(sbn, w):
        assert sbn.active_features() == channels
        i = sbn.width_index()
        out = sbn(x)
    bn = sbn.bn[affine_index]
    expected = F.batch_norm(x, None, None, bn.weight[:channels], bn.bias[:channels],
                            training=True, eps=bn.eps)
    torch.testing.assert_close(out, expected, **tol(torch.float64))
    out.square().sum().backward()
    grads = {j: b.weight.grad for j, b in enumerate(sbn.bn)}
    assert all((g is None) == (j != affine_index) for j, g in grads.items())
    if i is None:  # no listed width's statistics change at an uncalibrated width
        assert all(torch.equal(v, snapshot(sbn)[k]) for k, v in before.items())
        assert bn.weight.grad[channels:].abs().sum() == 0


def test_in_between_width_eval_needs_calibration_then_uses_its_own_stats(tol):
    sbn = make_any().eval()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    with slimops.width(sbn, 0.6):
        with pytest.raises(RuntimeError, match=r"width 0\.6 .*calibrate_bn\(model, loader, "
                                               r"widths=\[0\.6\]\)"):
            sbn(x)
        with pytest.raises(RuntimeError, match="calibrate"):
            sbn.eval_scale_shift()
    stats = sbn.new_calibration(0.6)
    assert stats.num_features == 4 and not stats.affine and sbn.calibrated["0_6"] is stats
    with torch.no_grad():
        stats.running_mean.normal_()
        stats.running_var.uniform_(0.5, 2.0)
    with slimops.width(sbn, 0.6):
        out = sbn(x)
        scale, shift = sbn.eval_scale_shift()
    bn = sbn.bn[2]  # 0.6: 4 channels, the γ/β prefix of the next larger listed width, 1.0
    expected = F.batch_norm(x, stats.running_mean, stats.running_var, bn.weight[:4],
                            bn.bias[:4], training=False, eps=bn.eps)
    torch.testing.assert_close(out, expected, **tol(torch.float64))
    torch.testing.assert_close(x * scale[:, None, None] + shift[:, None, None], expected,
                               **tol(torch.float64))
    # ... and in training the calibrated statistics track like a listed width's
    sbn.train()
    mean = stats.running_mean.clone()
    with slimops.width(sbn, 0.6):
        sbn(x)
    assert int(stats.num_batches_tracked) == 1
    torch.testing.assert_close(stats.running_mean, 0.9 * mean + 0.1 * x.mean((0, 2, 3)),
                               **tol(torch.float64))


def test_calibrated_stats_are_in_the_state_dict_and_load_into_a_fresh_layer(tol):
    sbn = make_any()
    with torch.no_grad():
        sbn.new_calibration(0.6).running_mean.normal_()
        sbn.new_calibration(0.3).running_var.uniform_(0.5, 2.0)
    state = sbn.state_dict()
    assert "calibrated.0_6.running_mean" in state and "calibrated.0_3.running_var" in state
    fresh = make_any()
    fresh.load_state_dict(state)
    assert sorted(fresh.calibrated) == ["0_3", "0_6"]
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    assert "calibrated=[0.3, 0.6]" in repr(fresh)
    bad = dict(state)
    bad["calibrated.0_6.running_mean"] = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="calibrated.0_6"):
        make_any().load_state_dict(bad)


def test_new_calibration_errors():
    sbn = make_any()
    with pytest.raises(ValueError, match="is listed"):
        sbn.new_calibration(0.5)
    with pytest.raises(ValueError, match="unknown width 1.5"):
        sbn.new_calibration(1.5)
    with pytest.raises(ValueError, match="unknown width 0.6"):
        make(shared=False).new_calibration(0.6)  # per-width lists: listed widths only
