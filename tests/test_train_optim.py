"""slimops.train.optim: the original recipe's weight decay groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimops.train import param_groups

from train_common import _single_thread  # noqa: F401  (an autouse fixture)
from train_common import tiny


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
