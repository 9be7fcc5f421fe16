"""torch.utils.flop_counter.FlopCounterMode counts slimmable models at their active width
(issue 16, item 3): every compiled op has a flop formula (slimops/ops/*.py, `register_flops`);
without them FlopCounterMode counted 0 for a whole slimmable model.

* Forward: the same count torch gives the reference style (slice + F.conv2d / F.linear).
* Backward: each gradient counts the forward's multiply-adds (it does that many). torch's own
  convolution_backward formula is not the oracle there: it ignores groups (a depthwise
  conv's weight gradient counts C times too much) and counts a strided input gradient over
  the zero-inserted input.
* Models: FlopCounterMode's total is 2x `slimops.profile`'s MACs less its pooling
  accumulates (which torch does not count) for every model at every width.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import slimops
from slimops import ops, reference
from slimops.models import MODELS
from slimops.profile import profile

pytestmark = pytest.mark.skipif(slimops.backend_info()["cpu"] != "C++",
                                reason="the formulas are for the compiled ops (slimops._C)")


def flops(fn) -> int:
    with FlopCounterMode(display=False) as mode:
        fn()
    return mode.get_total_flops()


def _leaves(*shapes):
    return [torch.randn(*s, requires_grad=True) for s in shapes]


# (name, slimops call, reference call, tensor shapes); partial widths, odd sizes, strides.
CASES = {
    "conv2d 3x3 prefix": (lambda x, w: ops.conv2d(x, w, None, 7, 1, 1),
                          lambda x, w: reference.conv2d(x, w, None, 7, 1, 1),
                          [(2, 5, 9, 9), (8, 6, 3, 3)]),
    "conv2d 3x3 s2 dilated": (lambda x, w: ops.conv2d(x, w, None, 5, 2, 2, 2),
                              lambda x, w: reference.conv2d(x, w, None, 5, 2, 2, 2),
                              [(1, 6, 11, 7), (8, 6, 3, 3)]),
    "conv2d 1x1": (lambda x, w: ops.conv2d(x, w, None, 16),
                   lambda x, w: reference.conv2d(x, w, None, 16),
                   [(3, 8, 5, 5), (24, 12, 1, 1)]),
    "conv2d grouped prefix": (lambda x, w: ops.conv2d(x, w, None, 6, 1, 1, groups=2),
                              lambda x, w: reference.conv2d(x, w, None, 6, 1, 1, groups=2),
                              [(2, 4, 9, 9), (8, 3, 3, 3)]),
    "depthwise s2": (lambda x, w: ops.depthwise_conv2d(x, w, None, 2, 1),
                     lambda x, w: reference.depthwise_conv2d(x, w, None, 2, 1),
                     [(2, 5, 9, 9), (8, 1, 3, 3)]),
    "linear prefix": (lambda x, w: ops.linear(x, w, None, 7),
                      lambda x, w: reference.linear(x, w, None, 7),
                      [(3, 5), (8, 6)]),
}


@pytest.mark.parametrize("ours,ref,shapes", CASES.values(), ids=list(CASES))
def test_forward_counts_like_the_reference_style(ours, ref, shapes):
    x, w = _leaves(*shapes)
    with torch.no_grad():
        got = flops(lambda: ours(x, w))
        assert got > 0
        assert got == flops(lambda: ref(x, w))


@pytest.mark.parametrize("ours,ref,shapes", CASES.values(), ids=list(CASES))
def test_each_gradient_counts_the_forwards_multiply_adds(ours, ref, shapes):
    x, w = _leaves(*shapes)
    with torch.no_grad():
        forward = flops(lambda: ours(x, w))
    assert flops(lambda: ours(x, w).sum().backward()) == 3 * forward
    x.grad = w.grad = None
    x.requires_grad_(False)  # the weight gradient alone
    assert flops(lambda: ours(x, w).sum().backward()) == 2 * forward


def test_dense_stride_1_training_counts_like_torch():
    # where torch's convolution_backward formula is exact, the two agree
    ours, ref, shapes = CASES["conv2d 3x3 prefix"]
    x, w = _leaves(*shapes)
    assert (flops(lambda: ours(x, w).sum().backward())
            == flops(lambda: ref(x, w).sum().backward()))


def _pooling_macs(model: nn.Module, x: torch.Tensor) -> int:
    """What `profile` counts for average pooling (one accumulate per input element)."""
    total = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0]
                                                                          + i[0][0].numel()))
             for m in model.modules() if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d))]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_counts_equal_profile_at_every_width(name):
    model = MODELS[name]().eval()
    size = (1, 3, 224, 224) if name != "slim_cnn" else (1, 3, 32, 32)
    x = torch.randn(size)
    for row in profile(model, size):
        with slimops.width(model, row.width):
            with torch.inference_mode():
                counted = flops(lambda: model(x))
            assert counted == 2 * (row.macs - _pooling_macs(model, x)), row.width


@pytest.mark.parametrize("first", ["slimops", "torch.utils.flop_counter"])
def test_formulas_register_in_either_import_order_without_importing_the_counter(first):
    """slimops does not import torch.utils.flop_counter (it imports triton: ~0.2 s of
    `import slimops`); its formulas register when the counter is imported, before or after."""
    import subprocess
    import sys

    second = "torch.utils.flop_counter" if first == "slimops" else "slimops"
    code = (f"import sys, {first}\n"
            "counter_loaded = 'torch.utils.flop_counter' in sys.modules\n"
            f"import {second}\n"
            "from torch.utils.flop_counter import flop_registry\n"
            "ops = sorted(str(k) for k in flop_registry if 'slimops' in str(k))\n"
            "print(counter_loaded, len(ops))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == ("False" if first == "slimops" else "True")
    # conv2d, depthwise, linear x (forward + 2 gradients), conv2d's both-gradients op, 2 fused
    assert int(out[1]) == 12
