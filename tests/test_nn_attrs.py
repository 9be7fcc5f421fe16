"""slimops.nn._attrs.held: the fast read of a module's parameters and buffers gives what
``getattr`` gives, for registered tensors, None entries and names a subclass redefines."""

from __future__ import annotations

import torch
from torch import nn

from slimops.nn._attrs import held


def test_held_reads_registered_parameters_and_buffers():
    bn = nn.BatchNorm2d(3)
    assert held(bn, "_parameters", "weight") is bn.weight
    assert held(bn, "_parameters", "bias") is bn.bias
    assert held(bn, "_buffers", "running_mean") is bn.running_mean
    assert held(bn, "_buffers", "running_var") is bn.running_var
    bn.running_var = torch.ones(3)  # a reassigned buffer: the module's dict holds the new one
    assert held(bn, "_buffers", "running_var") is bn.running_var


def test_held_reads_none_entries_as_none():
    bn = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    assert held(bn, "_parameters", "weight") is None
    assert held(bn, "_buffers", "running_mean") is None
    conv = nn.Conv2d(2, 4, 3, bias=False)
    assert held(conv, "_parameters", "bias") is None


def test_held_falls_back_to_getattr_for_names_not_registered():
    class Scaled(nn.BatchNorm2d):
        """A subclass that computes its weight: not in _parameters."""

        def __init__(self) -> None:
            super().__init__(3)
            del self._parameters["weight"]
            self.base = nn.Parameter(torch.ones(3))

        @property
        def weight(self):  # type: ignore[override]
            return self.base * 2

    bn = Scaled()
    assert torch.equal(held(bn, "_parameters", "weight"), torch.full((3,), 2.0))
    assert held(bn, "_buffers", "missing") is None


def test_held_reads_submodules_and_follows_their_replacement():
    seq = nn.Sequential(nn.ReLU(), nn.Identity())
    assert held(seq, "_modules", "0") is seq[0]
    block = nn.Module()
    block.conv = nn.Conv2d(1, 1, 1)
    first = block.conv
    assert held(block, "_modules", "conv") is first
    block.conv = nn.Conv2d(1, 1, 1)  # replaced: the dict holds the new one
    assert held(block, "_modules", "conv") is block.conv is not first
