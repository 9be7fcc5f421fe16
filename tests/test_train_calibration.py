"""slimops.train.calibration: BN calibration of listed and in-between widths, shared BNs
left alone, errors that put every statistic back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimops.nn import SlimConvBNAct, SwitchableBatchNorm2d
from slimops.train import calibrate_bn, evaluate
from slimops.width import width as width_scope

from train_common import _single_thread  # noqa: F401  (an autouse fixture)
from train_common import EXACT, batch, tiny


def _bn_stats(model):
    return {(id(layer), i): (bn.running_mean.clone(), bn.running_var.clone(),
                             bn.num_batches_tracked.clone())
            for layer in model.modules() if isinstance(layer, SwitchableBatchNorm2d)
            for i, bn in enumerate(layer.bn)}


def _randomize_stats(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(5)


def test_calibrate_bn_recomputes_one_widths_stats_only():
    cnn = tiny()
    shared = nn.BatchNorm2d(1).double()
    model = nn.Sequential(shared, cnn)  # a plain (shared) BN in front must stay untouched
    _randomize_stats(model)
    model.eval()
    cnn.blocks[0].train()  # mixed modes come back as they were
    modes = [m.training for m in model.modules()]
    shared_before = {k: v.clone() for k, v in shared.state_dict().items()}
    before = _bn_stats(model)

    blocks = [m for m in model.modules() if isinstance(m, SlimConvBNAct)]
    seen = {id(b): [] for b in blocks}
    for b in blocks:  # in training a block runs conv, then its switchable BN on that output
        b.conv.register_forward_hook(lambda m, a, out, b=b: seen[id(b)].append(out.clone()))
    batches = [batch(n=4, seed=s) for s in range(3)]

    calibrate_bn(model, batches, widths=[0.5], num_batches=2)

    assert [m.training for m in model.modules()] == modes
    assert all(bn.momentum == 0.1 for m in model.modules()
               if isinstance(m, SwitchableBatchNorm2d) for bn in m.bn)
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in shared_before.items())
    for b in blocks:
        inputs = seen[id(b)]
        assert len(inputs) == 2  # num_batches per width, at one width
        bn = b.bn.bn[1]
        mean = torch.stack([t.mean((0, 2, 3)) for t in inputs]).mean(0)
        var = torch.stack([t.var((0, 2, 3), unbiased=True) for t in inputs]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, **EXACT)
        torch.testing.assert_close(bn.running_var, var, **EXACT)
        assert int(bn.num_batches_tracked) == 2
        # ... which is what nn.BatchNorm2d does with momentum=None (cumulative average)
        plain = nn.BatchNorm2d(bn.num_features, momentum=None).double()
        for t in inputs:
            plain(t)
        torch.testing.assert_close(bn.running_mean, plain.running_mean, **EXACT)
        torch.testing.assert_close(bn.running_var, plain.running_var, **EXACT)
        for i in (0, 2):  # the other widths' statistics are untouched
            assert all(torch.equal(a, c) for a, c in
                       zip(before[(id(b.bn), i)], (b.bn.bn[i].running_mean,
                                                    b.bn.bn[i].running_var,
                                                    b.bn.bn[i].num_batches_tracked)))


def test_calibrate_bn_all_widths_bare_tensors_and_errors():
    model = tiny()
    _randomize_stats(model)
    xs = [batch(n=4, seed=s)[0] for s in range(2)]
    calibrate_bn(model, xs, num_batches=None)  # bare input tensors, the whole loader
    assert model.training
    for layer in model.modules():
        if isinstance(layer, SwitchableBatchNorm2d):
            assert all(int(bn.num_batches_tracked) == 2 for bn in layer.bn)

    before = _bn_stats(model)
    with pytest.raises(ValueError, match="no batch"):
        calibrate_bn(model, [])
    after = _bn_stats(model)  # a failed calibration puts every statistic back
    assert all(torch.equal(a, b) for k in before for a, b in zip(before[k], after[k]))
    assert all(bn.momentum == 0.1 for layer in model.modules()
               if isinstance(layer, SwitchableBatchNorm2d) for bn in layer.bn)
    with pytest.raises(ValueError, match=r"unknown width 0\.2.*or any width between"):
        calibrate_bn(model, xs, widths=[0.2])
    with pytest.raises(ValueError, match="num_batches"):
        calibrate_bn(model, xs, num_batches=0)
    with pytest.raises(ValueError, match="SwitchableBatchNorm2d"):
        from slimops.nn import SlimmableLinear
        calibrate_bn(SlimmableLinear([2, 4], 3, widths=(0.5, 1.0)), xs)


def test_calibrate_bn_leaves_a_bn_shared_by_all_widths_alone():
    # S-MobileNet v2's tail BN is shared by every width (as in the original): calibration
    # recomputes the switchable BNs and keeps the shared one as it was, also at a width
    # between the listed ones.
    from slimops.models import s_mobilenet_v2

    torch.manual_seed(0)
    model = s_mobilenet_v2(num_classes=10)
    _randomize_stats(model)
    tail = model.last_conv.bn.bn[0]
    tail_before = (tail.running_mean.clone(), tail.running_var.clone())
    stem_before = model.stem.bn.bn[0].running_mean.clone()
    xs = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    calibrate_bn(model, xs, widths=[0.35, 0.6])
    assert torch.equal(tail.running_mean, tail_before[0])
    assert torch.equal(tail.running_var, tail_before[1])
    assert not torch.equal(model.stem.bn.bn[0].running_mean, stem_before)
    model.eval()
    with width_scope(model, 0.6), torch.no_grad():
        assert torch.isfinite(model(xs[0])).all()
    # a model whose every BN is shared has nothing per width to calibrate
    naive = SlimConvBNAct([2, 4], [2, 4], 3, widths=(0.5, 1.0), shared_bn=True)
    with pytest.raises(ValueError, match="shares one BN"):
        calibrate_bn(naive, [torch.randn(2, 4, 5, 5)])


def test_calibrate_bn_in_between_width_then_eval():
    model = tiny()
    _randomize_stats(model)
    model.eval()
    x, y = batch()
    with pytest.raises(RuntimeError, match="calibrate"):
        evaluate(model, [(x, y)], widths=[0.6])
    before = _bn_stats(model)
    blocks = [m for m in model.modules() if isinstance(m, SlimConvBNAct)]
    seen = {id(b): [] for b in blocks}
    for b in blocks:
        b.conv.register_forward_hook(lambda m, a, out, b=b: seen[id(b)].append(out.clone()))
    batches = [batch(n=4, seed=s) for s in range(3)]

    calibrate_bn(model, batches, widths=[0.6000000001], num_batches=3)

    assert not model.training
    after = _bn_stats(model)  # no listed width's statistics change
    assert all(torch.equal(a, b) for k in before for a, b in zip(before[k], after[k]))
    for b in blocks:
        stats = b.bn.calibrated["0_6"]
        assert stats.momentum == 0.1 and int(stats.num_batches_tracked) == 3
        mean = torch.stack([t.mean((0, 2, 3)) for t in seen[id(b)]]).mean(0)
        torch.testing.assert_close(stats.running_mean, mean, **EXACT)
    acc = evaluate(model, [(x, y)], widths=[0.6])
    assert list(acc) == [0.6]

    # a failed calibration takes the new statistics away again
    with pytest.raises(ValueError, match="no batch"):
        calibrate_bn(model, [], widths=[0.7])
    assert all("0_7" not in b.bn.calibrated and "0_6" in b.bn.calibrated for b in blocks)
