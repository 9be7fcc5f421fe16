"""Building blocks of the ORIGINAL implementation's structure (JiahuiYu/slimmable_networks,
models/slimmable_ops.py), re-implemented independently in plain torch for the loader tests:
a global width switch, and layers that slice the prefix of their weight for the current
width index, with the original's attribute (state_dict key) names."""

import torch
import torch.nn.functional as F
from torch import nn


class Switch:
    """The original's global FLAGS: a width list and the current width."""

    def __init__(self, widths):
        self.widths = list(widths)
        self.width = max(widths)

    @property
    def idx(self):
        return self.widths.index(self.width)


class OrigConv(nn.Conv2d):
    def __init__(self, sw, ins, outs, k, stride, pad, groups_list=None):
        super().__init__(max(ins), max(outs), k, stride, pad,
                         groups=max(groups_list) if groups_list else 1, bias=False)
        self.sw, self.ins, self.outs, self.groups_list = sw, ins, outs, groups_list

    def forward(self, x):
        i = self.sw.idx
        groups = self.groups_list[i] if self.groups_list else 1
        w = self.weight[:self.outs[i], :self.ins[i]]
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, groups)


class OrigSBN(nn.Module):
    def __init__(self, sw, num_features_list):
        super().__init__()
        self.sw = sw
        self.bn = nn.ModuleList(nn.BatchNorm2d(c) for c in num_features_list)

    def forward(self, x):
        return self.bn[self.sw.idx](x)


def randomize_bn_state(model: nn.Module, gamma=(0.5, 2.0), std: float = 1.0) -> nn.Module:
    """Non-trivial γ, β and running statistics for every BN of an original-structure model
    (in place), so a loader that maps a BN to the wrong width or layer shows in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(*gamma)
                m.bias.normal_(0, std)
                m.running_mean.normal_(0, std)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model


def original_checkpoint(state_dict, **extra):
    """The original training script's layout: {'model': DataParallel state_dict, ...}."""
    return {"model": {"module." + k: v for k, v in state_dict.items()}, **extra}


def seeded_original(build, widths, num_classes=1000, input_size=64, seed=1):
    """``(switch, model)``: ``build(switch, num_classes, input_size)`` (an original-structure
    model class) built after ``torch.manual_seed(seed)``, its BN state randomized, in eval
    mode."""
    torch.manual_seed(seed)
    sw = Switch(widths)
    return sw, randomize_bn_state(build(sw, num_classes, input_size)).eval()


def assert_matches_original(model, orig, sw, widths, x, tol):
    """At each of ``widths``, ``model`` (slimops, width set with ``slimops.width``) computes
    on ``x`` what ``orig`` computes with its switch ``sw`` at that width; returns the
    original's outputs, one per width. ``tol``: the conftest fixture's function."""
    from slimops.width import width

    outs = []
    for w in widths:
        sw.width = w
        with torch.no_grad(), width(model, w):
            expected = orig(x)
            got = model(x)
        assert expected.std() > 0
        torch.testing.assert_close(got, expected, **tol(torch.float32, like=expected))
        outs.append(expected)
    return outs
