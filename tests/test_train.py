"""slimops.train: Algorithm 1, sandwich rule, in-place distillation, BN calibration, weight
decay groups, per-width evaluation, the trainer and exact checkpoint resume."""

from __future__ import annotations

import copy
import importlib.util
import random
import sys
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimops.models import slim_cnn
from slimops.nn import SlimConvBNAct, SwitchableBatchNorm2d
from slimops.train import (
    RANDOM_WIDTHS,
    Trainer,
    calibrate_bn,
    evaluate,
    param_groups,
    sandwich_widths,
    slimmable_step,
    soft_cross_entropy,
)
from slimops.width import get_width
from slimops.width import width as width_scope

WIDTHS = (0.25, 0.5, 1.0)
EXACT = dict(rtol=1e-12, atol=1e-13)  # float64, same operations in the same order


def tiny(widths=WIDTHS, dtype=torch.float64) -> nn.Module:
    return slim_cnn(widths=widths, num_classes=4, in_channels=1, base=(8, 16, 32)).to(dtype)


def batch(n=6, size=8, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, size, size, generator=g, dtype=dtype),
            torch.randint(0, 4, (n,), generator=g))


def per_width_grads(model, x, y, w, loss_of=None):
    """``loss(model at w)`` and its gradient, on a copy of ``model`` (None -> zeros)."""
    c = copy.deepcopy(model)
    with width_scope(c, w):
        out = c(x)
    loss = F.cross_entropy(out, y) if loss_of is None else loss_of(out)
    loss.backward()
    return loss.item(), {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                         for n, p in c.named_parameters()}


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Small ops on a shared 2-core machine: one thread is faster and bitwise repeatable."""
    yield


# --------------------------------------------------------------------------- Algorithm 1


def test_step_accumulates_the_sum_of_per_width_gradients_and_steps_once():
    model = tiny().train()
    x, y = batch()
    expected_losses, grads = {}, {}
    for w in (1.0, 0.5, 0.25):  # the order Algorithm 1 accumulates in
        expected_losses[w], grads[w] = per_width_grads(model, x, y, w)
    total = {n: grads[1.0][n] + grads[0.5][n] + grads[0.25][n] for n in grads[1.0]}
    assert any(bool(t.abs().sum() > 0) for t in total.values())

    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = []
    step = opt.step
    opt.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    for p in model.parameters():  # stale gradients must be cleared first
        p.grad = torch.full_like(p, 7.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    losses = slimmable_step(model, x, y, nn.CrossEntropyLoss(), opt)

    assert steps == [1]
    assert list(losses) == [1.0, 0.5, 0.25]
    assert all(type(v) is float for v in losses.values())
    for w in losses:
        assert losses[w] == pytest.approx(expected_losses[w], rel=1e-12)
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, total[n], **EXACT, msg=n)
        torch.testing.assert_close(p.detach(), before[n] - lr * total[n], **EXACT, msg=n)


def test_step_goes_largest_to_smallest_with_one_graph_alive_at_a_time():
    model = tiny().train()
    x, y = batch()
    events, live, packed = [], [], []

    class Holder:
        def __init__(self, t):
            self.t = t

    def pack(t):
        h = Holder(t)
        packed.append(weakref.ref(h))
        return h

    def pre(module, args):
        # The previous width's output, loss and every tensor its graph saved must be gone.
        assert [r for r in live if r() is not None] == []
        assert [r for r in packed if r() is not None] == []
        events.append(("forward", get_width(module)))

    def post(module, args, out):
        w = get_width(module)
        live.append(weakref.ref(out))
        out.register_hook(lambda g: events.append(("backward", w)))

    def loss_fn(out, target):
        loss = F.cross_entropy(out, target)
        live.append(weakref.ref(loss))
        return loss

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    zero_grad, step = opt.zero_grad, opt.step
    opt.zero_grad = lambda *a, **k: (events.append(("zero_grad",)), zero_grad(*a, **k))[1]
    opt.step = lambda *a, **k: (events.append(("step",)), step(*a, **k))[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        slimmable_step(model, x, y, loss_fn, opt)
    assert packed, "the saved-tensor hooks saw nothing: the graph check would be vacuous"
    assert events == [("zero_grad",),
                      ("forward", 1.0), ("backward", 1.0),
                      ("forward", 0.5), ("backward", 0.5),
                      ("forward", 0.25), ("backward", 0.25),
                      ("step",)]
    assert [r for r in live + packed if r() is not None] == []


def test_step_subset_of_widths_and_errors_leave_gradients_alone():
    model = tiny().train()
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    assert list(slimmable_step(model, x, y, nn.CrossEntropyLoss(), opt, widths=[0.25, 1])) \
        == [1.0, 0.25]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"unknown width 1\.5.*\(0\.25, 0\.5, 1\.0\)"):
        slimmable_step(model, x, y, nn.CrossEntropyLoss(), opt, widths=[1.5, 1.0])
    assert all(bool((p.grad == 1).all()) for p in model.parameters())
    with pytest.raises(ValueError, match="scalar"):
        slimmable_step(model, x, y, nn.CrossEntropyLoss(reduction="none"), opt)


# --------------------------------------------------------------------------- sandwich rule

MANY = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)


def test_sandwich_widths_extremes_distinct_draws_reproducible():
    middle = set(MANY[1:-1])
    seen = set()
    for seed in range(20):
        ws = sandwich_widths(MANY, 2, torch.Generator().manual_seed(seed))
        assert ws[0] == 1.0 and ws[-1] == 0.25 and len(ws) == 4
        drawn = ws[1:-1]
        assert len(set(drawn)) == 2 and set(drawn) <= middle
        assert drawn == sorted(drawn, reverse=True)
        assert ws == sandwich_widths(MANY, 2, torch.Generator().manual_seed(seed))
        seen.add(tuple(drawn))
    assert len(seen) > 1  # it is random
    assert sandwich_widths(MANY, 0) == [1.0, 0.25]
    # More draws than in-between widths: rounds without replacement, each width once per round.
    ws = sandwich_widths(MANY, 6, torch.Generator().manual_seed(0))
    drawn = ws[1:-1]
    assert len(drawn) == 6 and set(drawn) == middle
    assert sorted(drawn.count(w) for w in middle) == [1, 1, 2, 2]


@pytest.mark.parametrize("n, widths, match", [
    (-1, MANY, "non-negative int"),
    (1.5, MANY, "non-negative int"),
    (True, MANY, "non-negative int"),
    (1, (0.5, 1.0), "strictly between"),
    (0, (1.0,), "at least two"),
])
def test_sandwich_widths_errors(n, widths, match):
    with pytest.raises(ValueError, match=match):
        sandwich_widths(widths, n)


@pytest.mark.parametrize("any_width", [True, False], ids=["rules", "lists"])
def test_step_with_sandwich_trains_the_drawn_widths(any_width, make_cnn):
    # slim_cnn is built from channel rules (any width in between); make_cnn from lists
    model = (tiny(MANY) if any_width else make_cnn(torch.float64, MANY)).train()
    x, y = batch() if any_width else (torch.randn(6, 3, 8, 8, dtype=torch.float64),
                                      torch.randint(0, 10, (6,)))
    order = []
    model.register_forward_pre_hook(lambda m, a: order.append(get_width(m)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for seed in (0, 1, 2):
        order.clear()
        losses = slimmable_step(model, x, y, nn.CrossEntropyLoss(), opt, sandwich=2,
                                generator=torch.Generator().manual_seed(seed))
        expected = sandwich_widths(MANY, 2, torch.Generator().manual_seed(seed),
                                   continuous=any_width)
        assert order == expected and list(losses) == expected
        assert any_width == any(w not in MANY for w in expected)


def test_sandwich_widths_continuous_draws_from_the_interval():
    seen = set()
    for seed in range(50):
        ws = sandwich_widths((0.25, 1.0), 3, torch.Generator().manual_seed(seed),
                             continuous=True)
        assert ws[0] == 1.0 and ws[-1] == 0.25 and len(ws) == 5
        assert all(0.25 < w < 1.0 and w == round(w, 6) for w in ws[1:-1])
        assert ws[1:-1] == sorted(ws[1:-1], reverse=True)
        assert ws == sandwich_widths((0.25, 1.0), 3, torch.Generator().manual_seed(seed),
                                     continuous=True)
        seen.update(ws[1:-1])
    assert len(seen) == 150  # continuous: no repeats
    assert min(seen) < 0.3 and max(seen) > 0.95  # spread over the interval


def test_sandwich_step_gradient_is_the_sum_over_the_drawn_widths():
    # Algorithm 1 with the sandwich rule at random widths between the switches: the shared
    # gradient is the sum of the per-width gradients at exactly the drawn widths.
    model = tiny((0.25, 1.0)).train()
    x, y = batch()
    drawn = sandwich_widths((0.25, 1.0), 2, torch.Generator().manual_seed(3), continuous=True)
    total = None
    for w in drawn:
        _, g = per_width_grads(model, x, y, w)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    losses = slimmable_step(model, x, y, nn.CrossEntropyLoss(), opt, sandwich=2,
                            generator=torch.Generator().manual_seed(3))
    assert list(losses) == drawn
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, total[n], **EXACT, msg=n)
    # an in-between width's BN γ is the next larger listed width's (here 1.0x's) prefix
    bn = model.stem.bn
    assert bn.bn[0].weight.grad is not None and bn.bn[1].weight.grad is not None
    assert len(bn.calibrated) == 0  # training never creates statistics by itself


# --------------------------------------------------------------------------- distillation


def test_inplace_distillation_soft_targets_from_the_detached_largest():
    model = tiny().train()
    x, y = batch()
    ref = copy.deepcopy(model)

    with width_scope(ref, 1.0):
        teacher_logits = ref(x).detach()
    p = F.softmax(teacher_logits, dim=-1)

    def soft_ce(out):
        return -(p * F.log_softmax(out, dim=-1)).sum(-1).mean()

    expected, grads = {}, {}
    expected[1.0], grads[1.0] = per_width_grads(ref, x, y, 1.0)
    for w in (0.5, 0.25):
        expected[w], grads[w] = per_width_grads(ref, x, y, w, soft_ce)
        # soft CE = KL(p || q) + H(p): the same gradient as the KL divergence
        with width_scope(ref, w):
            log_q = F.log_softmax(ref(x), dim=-1)
        kl = F.kl_div(log_q, p, reduction="batchmean") - (p * p.log()).sum(-1).mean()
        assert expected[w] == pytest.approx(kl.item(), rel=1e-12)
    total = {n: grads[1.0][n] + grads[0.5][n] + grads[0.25][n] for n in grads[1.0]}

    largest_output_grads = []

    def post(module, args, out):
        if get_width(module) == 1.0:
            out.register_hook(lambda g: largest_output_grads.append(g))

    model.register_forward_hook(post)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = slimmable_step(model, x, y, nn.CrossEntropyLoss(), opt, inplace_distillation=True)

    for w in WIDTHS:
        assert losses[w] == pytest.approx(expected[w], rel=1e-12), w
    # Only the largest width's own loss reaches its output.
    assert len(largest_output_grads) == 1
    with torch.no_grad():
        manual = (p - F.one_hot(y, 4).to(p.dtype)) / len(y)
    torch.testing.assert_close(largest_output_grads[0], manual, **EXACT)
    for n, p_ in model.named_parameters():
        torch.testing.assert_close(p_.grad, total[n], **EXACT, msg=n)


def test_soft_cross_entropy_shape_check():
    with pytest.raises(ValueError, match="differ in shape"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- BN calibration


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


def test_trainer_sandwich_between_two_switches():
    # US-Nets style: only the two extremes are listed (and keep their own BN); random widths
    # in between are trained, then calibrated and evaluated.
    model = tiny((0.25, 1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = Trainer(model, opt, sandwich=2, seed=0, progress=False)
    loader = [batch(seed=s) for s in range(3)]
    losses = trainer.train_epoch(loader)
    assert list(losses) == [1.0, 0.25, RANDOM_WIDTHS]
    calibrate_bn(model, loader, widths=[0.4, 0.8])
    acc = evaluate(model, loader, widths=[0.25, 0.4, 0.8, 1.0])
    assert list(acc) == [1.0, 0.8, 0.4, 0.25]
    from slimops.nn import SlimmableLinear

    listed_only = SlimmableLinear([2, 4], 3, widths=(0.5, 1.0))
    with pytest.raises(ValueError, match="channel rules"):
        Trainer(listed_only, torch.optim.SGD(listed_only.parameters(), lr=0.1), sandwich=1)


# --------------------------------------------------------------------------- weight decay


def test_param_groups_weight_decay_rules():
    model = tiny()
    groups = param_groups(model, 4e-5)
    assert [g["weight_decay"] for g in groups] == [4e-5, 0.0]
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not decay & no_decay and decay | no_decay == set(names)
    for n, p in model.named_parameters():
        depthwise = "depthwise.conv" in n
        if ".bn." in n or n.endswith("bias") or depthwise:
            assert id(p) in no_decay, n
        else:
            assert id(p) in decay, n
        if depthwise:
            assert p.shape[1] == 1 and p.dim() == 4
    # The 1-channel stem has a [C, 1, 3, 3] weight but is not depthwise: it decays.
    assert model.stem.conv.weight.shape[1] == 1 and id(model.stem.conv.weight) in decay
    assert id(model.classifier.weight) in decay
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # a valid optimizer spec

    plain = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8),
                          nn.Flatten(), nn.Linear(8, 2))
    plain[1].bias.requires_grad_(False)
    g = param_groups(plain, 0.1)
    assert [id(p) for p in g[0]["params"]] == [id(plain[1].weight), id(plain[4].weight)]
    assert [id(p) for p in g[1]["params"]] == [id(plain[0].weight), id(plain[0].bias),
                                               id(plain[2].weight), id(plain[2].bias),
                                               id(plain[4].bias)]
    with pytest.raises(ValueError, match="non-negative"):
        param_groups(model, -1.0)


# --------------------------------------------------------------------------- evaluation


def test_evaluate_per_width_accuracy_counts_samples():
    model = tiny()
    x, _ = batch(n=8)
    model.eval()
    with torch.no_grad():
        preds = {}
        for w in WIDTHS:
            with width_scope(model, w):
                preds[w] = model(x).argmax(-1)
    # Right on the full width's first 5 samples, wrong on the last 3.
    y = preds[1.0].clone()
    y[5:] = (y[5:] + 1) % 4
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]  # uneven batches: accuracy counts samples
    model.train()
    acc = evaluate(model, loader)
    assert model.training
    assert list(acc) == [1.0, 0.5, 0.25]
    assert acc[1.0] == 5 / 8
    for w in (0.5, 0.25):
        assert acc[w] == (preds[w] == y).sum().item() / 8
    assert list(evaluate(model, loader, widths=[0.5])) == [0.5]
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, [])
    with pytest.raises(TypeError, match="inputs, targets"):
        evaluate(model, [x])


# --------------------------------------------------------------------------- trainer


class NoisyData(torch.utils.data.Dataset):
    """Draws from python's `random` and numpy per sample, so resuming must restore both."""

    def __init__(self, n=12):
        self.x, self.y = batch(n=n, seed=3)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        noise = random.gauss(0.0, 0.1) + float(np.random.normal(0.0, 0.1))
        return self.x[i] + noise, self.y[i]


def make_trainer(init_seed, **kw):
    torch.manual_seed(init_seed)
    model = tiny((0.25, 0.5, 0.75, 1.0))
    opt = torch.optim.SGD(param_groups(model, 1e-3), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    kw = {"sandwich": 1, "inplace_distillation": True, "seed": 123, "progress": False, **kw}
    return Trainer(model, opt, scheduler=sched, **kw)


def _seed_all(s):
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def test_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    loader = torch.utils.data.DataLoader(NoisyData(), batch_size=4, shuffle=True)
    val = [batch(n=4, seed=9)]

    _seed_all(0)
    straight = make_trainer(0)
    straight.fit(loader, 2, val)

    _seed_all(0)
    first = make_trainer(0)
    first.fit(loader, 1, val)
    path = tmp_path / "ckpt.pt"
    first.save_checkpoint(path)
    torch.load(path, weights_only=True)  # only tensors and primitive containers

    _seed_all(999)  # a different process state, and a differently initialised model
    resumed = make_trainer(7, seed=5)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (loads.append(k), real_load(*a, **k))[1])
    assert resumed.load_checkpoint(path) == 1
    assert [k.get("weights_only") for k in loads] == [True]
    resumed.fit(loader, 2, val)

    assert resumed.epoch == straight.epoch == 2
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)
    assert straight.scheduler.state_dict() == resumed.scheduler.state_dict()
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    assert straight.history == resumed.history
    assert straight.global_step == resumed.global_step == 6


def test_checkpoint_mismatch_errors(tmp_path):
    t = make_trainer(0)
    path = tmp_path / "ckpt.pt"
    t.save_checkpoint(path)
    other = make_trainer(0, widths=[0.25, 1.0], sandwich=None)
    with pytest.raises(ValueError, match="widths"):
        other.load_checkpoint(path)
    no_sched = Trainer(t.model, t.optimizer, progress=False)
    with pytest.raises(ValueError, match="scheduler"):
        no_sched.load_checkpoint(path)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a slimops trainer checkpoint"):
        t.load_checkpoint(tmp_path / "other.pt")


def test_trainer_progress_bar_and_fallback(capsys, monkeypatch):
    x, y = batch(n=8)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    t = make_trainer(0, progress=True, sandwich=None, inplace_distillation=False,
                     scheduler_interval="step")
    if importlib.util.find_spec("tqdm") is not None:
        losses = t.train_epoch(loader)
        err = capsys.readouterr().err
        assert "1x:" in err and "0.25x:" in err
        assert list(losses) == [1.0, 0.75, 0.5, 0.25]
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    t.train_epoch(loader)
    assert "1x:" not in capsys.readouterr().err
    assert t.global_step == t.scheduler.last_epoch  # stepped once per batch


def test_trainer_fit_history_and_errors():
    x, y = batch(n=8)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    t = make_trainer(0)
    new = t.fit(loader, 2, loader)
    assert [e["epoch"] for e in new] == [1, 2] and t.history == new
    # sandwich=1 on a model built from channel rules: the extremes, and the random width
    # drawn between them on each batch, reported together
    assert list(new[0]["train_loss"]) == [1.0, 0.25, RANDOM_WIDTHS]
    assert set(new[0]["val_acc"]) == {1.0, 0.75, 0.5, 0.25}
    assert t.fit(loader, 2) == []  # already there
    assert t.scheduler.last_epoch == 2
    with pytest.raises(ValueError, match="no batch"):
        t.train_epoch([])
    with pytest.raises(ValueError, match="epochs"):
        t.fit(loader, -1)
    with pytest.raises(ValueError, match="unknown width"):
        make_trainer(0, widths=[0.2, 1.0])
    # two widths and the sandwich rule: the model runs at any width in between
    assert make_trainer(0, widths=[0.25, 1.0], sandwich=1).widths == (0.25, 1.0)
    with pytest.raises(ValueError, match="scheduler_interval"):
        make_trainer(0, scheduler_interval="batch")
