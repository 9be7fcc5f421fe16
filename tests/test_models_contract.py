"""One contract for every registered model (``slimops.models.MODELS``), as timm tests all its
models alike: forward at every width in eval and training, every conv fused with its BN,
training touching only the active width's statistics, custom width lists and class counts,
gradients only in the active prefix of a shared weight, and state_dict round trips. The
per-model files keep what is particular to one architecture (channel rules, the paper's
counts, the original's checkpoints)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimops.models import MODELS, create_model
from slimops.nn import SlimConvBNAct, SlimmableConv2d, SwitchableBatchNorm2d
from slimops.width import width

NAMES = sorted(MODELS)


def _input(name: str, n: int = 2) -> torch.Tensor:
    # The ImageNet models at 64x64 (stride 32 leaves 2x2); the digits-style CNN smaller.
    side = 16 if name == "slim_cnn" else 64
    return torch.randn(n, 3, side, side)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = create_model(name)
        return cache[name]
    return get


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_every_width(models, name, train):
    model = models(name)
    x = _input(name)
    classes = model.classifier.out_features
    model.train(train)
    try:
        outs = []
        for w in model.widths:
            with width(model, w), torch.no_grad():
                out = model(x)
            assert out.shape == (2, classes) and torch.isfinite(out).all(), w
            outs.append(out)
        if train:  # batch statistics: the smallest and largest width differ
            assert not torch.allclose(outs[0], outs[-1])
    finally:
        model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_every_conv_is_fused_with_a_switchable_bn(models, name):
    model = models(name)
    fused = [m for m in model.modules() if isinstance(m, SlimConvBNAct)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and len(convs) == len(fused)
    assert all(isinstance(m, SlimmableConv2d) for m in convs)
    owned = {id(bn) for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)
             for bn in m.bn}
    assert all(id(m) in owned for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name", NAMES)
def test_training_updates_only_the_active_widths_statistics(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    layer = next(m for m in model.modules()
                 if isinstance(m, SwitchableBatchNorm2d) and not m.shared)
    before = [bn.running_mean.clone() for bn in layer.bn]
    w = model.widths[1]
    with width(model, w), torch.no_grad():
        model(_input(name))
    changed = [not torch.equal(b, bn.running_mean) for b, bn in zip(before, layer.bn)]
    assert changed == [i == 1 for i in range(len(model.widths))]


@pytest.mark.parametrize("name", NAMES)
def test_custom_widths_and_classes(name):
    default = create_model(name).widths
    custom = tuple(reversed(default[1:]))  # unsorted on purpose, one switch fewer
    model = create_model(name, widths=custom, num_classes=7).eval()
    assert model.widths == tuple(sorted(custom))
    x = _input(name)
    for w in model.widths:
        with width(model, w), torch.no_grad():
            assert model(x).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown width"):
        with width(model, default[0] / 2):
            pass


@pytest.mark.parametrize("name", NAMES)
def test_gradients_stay_in_the_active_prefix(name):
    """The stem conv's shared weight gets gradient in the rows the smallest width uses only."""
    torch.manual_seed(0)
    model = create_model(name).train()
    w = model.widths[0]
    with width(model, w):
        model(_input(name)).square().mean().backward()
    stem = next(m for m in model.modules() if isinstance(m, SlimConvBNAct)).conv
    with width(model, w):
        _, cout = stem.active_channels()
    grad = stem.weight.grad
    assert torch.isfinite(grad).all()
    # rows in use: the first cout (ShuffleNet's grouped stem: each group's block prefix)
    groups = 1 if stem.depthwise else stem.groups
    block, used = grad.shape[0] // groups, cout // groups
    active = torch.arange(grad.shape[0]) % block < used
    assert grad[active].abs().sum() > 0 and grad[~active].abs().sum() == 0


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(models, name):
    model = models(name).eval()
    torch.manual_seed(1)
    other = create_model(name).eval()
    other.load_state_dict(model.state_dict())
    x = _input(name)
    w = model.widths[-1]
    with torch.no_grad(), width(model, w), width(other, w):
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
