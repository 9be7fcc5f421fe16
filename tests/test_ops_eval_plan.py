"""slimops.ops.eval_plan / eval_plan_call: a conv call from a cached plan, checked in one C
call (the layer-level behaviour is in tests/test_nn_fused.py)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from slimops import ops

pytestmark = pytest.mark.skipif(ops.backend_info()["cpu"] != "C++",
                                reason="the compiled plan needs the C++ extension")


def _plan(depthwise=False, lookups=(), weight=None, sources=None, cin=4):
    """A plan for a 3x3 conv of ``cin`` input channels on a weight of 8 rows, 6 per group
    column (depthwise: 8 channels), the BN-like vectors as its stamped sources."""
    if weight is None:
        weight = torch.randn(8, 1 if depthwise else 6, 3, 3, dtype=torch.float64)
    scale = torch.rand(cin if depthwise else 5, dtype=torch.float64) + 0.5
    shift = torch.randn_like(scale)
    sources = [scale, shift] if sources is None else sources
    stamp = ops.state_stamp(*sources)
    plan = ops.eval_plan(list(lookups), sources, stamp, cin, depthwise, weight, None, 5,
                         (1, 1), (1, 1), (1, 1), 1, scale, shift, 1)
    return plan, weight, scale, shift


def _expected(x, weight, scale, shift, depthwise):
    if depthwise:
        return ops.depthwise_conv2d(x, weight, None, 1, 1, 1, scale, shift, None, "relu")
    return ops.conv2d(x, weight, None, 5, 1, 1, 1, 1, scale, shift, None, "relu")


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_plan_call_is_the_op(depthwise):
    plan, weight, scale, shift = _plan(depthwise)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    out = ops.eval_plan_call(plan, x, None)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, _expected(x, weight, scale, shift, depthwise))


def test_a_moved_entry_or_a_written_source_is_stale():
    holder = {"weight": object()}
    plan, *_ = _plan(lookups=[(holder, "weight", holder["weight"])])
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert isinstance(ops.eval_plan_call(plan, x, None), torch.Tensor)
    holder["weight"] = object()  # replaced
    assert ops.eval_plan_call(plan, x, None) is ops.STALE_PLAN
    del holder["weight"]  # removed
    assert ops.eval_plan_call(plan, x, None) is ops.STALE_PLAN

    plan, _, scale, _ = _plan()
    with torch.no_grad():
        scale.mul_(2.0)  # a source written in place: its version moved
    assert ops.eval_plan_call(plan, x, None) is ops.STALE_PLAN


def test_unusual_calls_decline():
    plan, weight, *_ = _plan()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert ops.eval_plan_call(plan, torch.randn(1, 3, 5, 5, dtype=torch.float64), None) is None
    assert ops.eval_plan_call(plan, x.float(), None) is None  # not the weight's dtype
    assert ops.eval_plan_call(plan, x[0], None) is None  # 3 dims
    assert ops.eval_plan_call(plan, x, 1.0) is None  # a residual that is not a tensor
    assert ops.eval_plan_call(plan, x, torch.randn(1, 5, 4, 4, dtype=torch.float64)) is None
    strided, *_ = _plan(weight=torch.randn(6, 8, 3, 3, dtype=torch.float64).transpose(0, 1))
    assert ops.eval_plan_call(strided, x, None) is None  # the kernels need it contiguous

    class Sub(torch.Tensor):
        pass

    assert ops.eval_plan_call(plan, x.as_subclass(Sub), None) is None

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():
        assert ops.eval_plan_call(plan, x, None) is None  # the mode is to see the op


@pytest.mark.parametrize("bad", [(), (1, 2, 3, 4, 5), "plan", None])
def test_malformed_plans_decline(bad):
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert ops.eval_plan_call(bad, x, None) is None


def test_malformed_parts_decline():
    plan, *_ = _plan()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    for i, part in ((0, ({}, "k")), (0, [({}, "k", 1)]), (1, [None]), (2, "stamp"), (3, "4"),
                    (4, 1)):
        broken = plan[:i] + (part,) + plan[i + 1:]
        assert ops.eval_plan_call(broken, x, None) is None, i
    assert ops.eval_plan_call(plan[:-1], x, None) is None  # an argument short


def test_without_a_bytes_stamp_there_is_no_plan():
    weight = torch.randn(8, 6, 3, 3)
    v = torch.rand(5)
    assert ops.eval_plan([], [v], ("a", "python", "stamp"), 4, False, weight, None, 5,
                         (1, 1), (1, 1), (1, 1), 1, v, v, 0) is None


# ------------------------------------------------ eval_chain_call: several plans in one C call


def _chain_plans():
    """Three plans: a 3x3 conv 4 -> 5, a 5-channel depthwise 3x3, a 3x3 conv 5 -> 5 (as plan
    shapes: ``_plan``'s weights, 5 output channels each)."""
    first, w1, s1, h1 = _plan()
    second, w2, s2, h2 = _plan(depthwise=True, cin=5)
    third, w3, s3, h3 = _plan(weight=torch.randn(8, 5, 3, 3, dtype=torch.float64), cin=5)
    return (first, second, third), ((w1, s1, h1), (w2, s2, h2), (w3, s3, h3))


def test_chain_is_the_plans_in_turn_with_residual_slots():
    plans, _ = _chain_plans()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    # slot 0: x; step 0 on x; step 1 on step 0's output; step 2 on step 1's with step 0's
    # output as its residual
    out = ops.eval_chain_call(plans, (0, -1, 1, -1, 2, 1), x)
    a = ops.eval_plan_call(plans[0], x, None)
    b = ops.eval_plan_call(plans[1], a, None)
    want = ops.eval_plan_call(plans[2], b, a)
    assert isinstance(out, torch.Tensor) and torch.equal(out, want)
    # one step; two steps on the same source (the last one's output is the result)
    assert torch.equal(ops.eval_chain_call(plans[:1], (0, -1), x), a)
    two = ops.eval_chain_call((plans[0], plans[0]), (0, -1, 0, 1), x)
    assert torch.equal(two, ops.eval_plan_call(plans[0], x, a))


def test_chain_with_a_stale_plan_is_stale():
    holder = {"weight": object()}
    stale, *_ = _plan(lookups=[(holder, "weight", holder["weight"])])
    plans, _ = _chain_plans()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    chain = (plans[0], plans[1], stale)
    links = (0, -1, 1, -1, 0, -1)  # the stale plan takes x's 4 channels
    assert isinstance(ops.eval_chain_call(chain, links, x), torch.Tensor)
    holder["weight"] = object()
    assert ops.eval_chain_call(chain, links, x) is ops.STALE_PLAN


def test_unusual_chains_decline():
    plans, _ = _chain_plans()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    links = (0, -1, 1, -1, 2, -1)
    for bad_links in ((0, -1, 1, -1), (0, -1, 1, -1, 3, -1), (1, -1, 1, -1, 2, -1),
                      (0, -1, 1, 2, 2, -1), (0, -1, 1, -1, 2, -2), (0, -1, 1, -1, 2, None),
                      [0, -1, 1, -1, 2, -1]):
        assert ops.eval_chain_call(plans, bad_links, x) is None, bad_links
    assert ops.eval_chain_call((), (), x) is None
    assert ops.eval_chain_call(list(plans), links, x) is None  # a list, not a tuple
    assert ops.eval_chain_call(plans, links, torch.randn(1, 3, 5, 5, dtype=torch.float64)) is None
    assert ops.eval_chain_call(plans, links, x.float()) is None
    # a later step's source of other channels (step 1 takes 5, here it gets x's 4)
    assert ops.eval_chain_call(plans, (0, -1, 0, -1, 2, -1), x) is None
    # the kernel rejects a residual of another shape (x's) at step 2: declined, not raised
    assert ops.eval_chain_call(plans, (0, -1, 1, -1, 2, 0), x) is None
    assert ops.eval_chain_call((plans[0], "plan", plans[2]), links, x) is None

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():
        assert ops.eval_chain_call(plans, links, x) is None
