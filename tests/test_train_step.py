"""slimops.train.step: Algorithm 1 (one step accumulates every width's gradient), the
sandwich rule, in-place distillation."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimops.train import sandwich_widths, slimmable_step, soft_cross_entropy
from slimops.width import get_width
from slimops.width import width as width_scope

from train_common import _single_thread  # noqa: F401  (an autouse fixture)
from train_common import EXACT, WIDTHS, batch, per_width_grads, tiny


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


# --------------------------------------------------------------------------- mixed precision

def test_slimmable_step_autocast_and_grad_scaler():
    """autocast_dtype runs each width's forward under torch.autocast (stock layers compute
    in bfloat16; distillation's soft targets stay float32); a GradScaler scales each width's
    loss and unscales the accumulated gradients once: with power-of-two scales the step
    equals the unscaled one."""
    from slimops.train import slimmable_step

    torch.manual_seed(0)
    model = nn.Sequential(tiny(dtype=torch.float32), nn.Linear(4, 4))
    x, y = batch(dtype=torch.float32)
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = slimmable_step(model, x, y, F.cross_entropy, opt, autocast_dtype=torch.bfloat16,
                            inplace_distillation=True)
    assert seen == [torch.bfloat16] * len(WIDTHS)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())

    plain, scaled = tiny(), tiny()
    scaled.load_state_dict(plain.state_dict())
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(scaled.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = batch()
    for _ in range(2):
        a = slimmable_step(plain, x, y, F.cross_entropy, opt_a)
        b = slimmable_step(scaled, x, y, F.cross_entropy, opt_b, scaler=scaler)
        assert a == pytest.approx(b)  # the reported losses are unscaled
    for (name, p), q in zip(plain.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    assert scaler.get_scale() == 2.0 ** 10  # no overflow: the scale stays
