"""slimops.ops.state_stamp: equal stamps while tensors are unchanged, different after every
kind of write or replacement a cache must notice; the compiled stamp and the Python one
agree on that."""

from __future__ import annotations

import pytest
import torch

from slimops.ops import _backend
from slimops.ops.state_stamp import _python_stamp, state_stamp


STAMPS = [pytest.param(state_stamp, id="state_stamp"),
          pytest.param(_python_stamp, id="python")]


@pytest.mark.parametrize("stamp", STAMPS)
def test_state_stamp_changes_with_each_kind_of_replaced_state(stamp):
    """``state_stamp`` (what the fast path's plans compare on every call): equal while nothing
    changed; different after each write or replacement the plan must notice; None where a
    tensor cannot tell (an inference tensor, a tensor subclass)."""
    t = torch.nn.Parameter(torch.rand(6))
    u = torch.rand(6)
    keep = [t, u]  # held, as a plan holds its sources
    first = stamp(t, None, u)
    assert first is not None and stamp(t, None, u) == first
    assert stamp(t, u, None) != first  # position of the absent tensor
    changes = {
        "in place": lambda: u.add_(1.0),
        "data assignment": lambda: setattr(t, "data", torch.rand(6)),
        "view written": lambda: u.view(2, 3)[0].zero_(),
        "same storage, new shape": lambda: setattr(t, "data", t.data.view(2, 3)),
        "same storage, new strides": lambda: setattr(t, "data", t.data.view(3, 2).t()),
        "dtype": lambda: setattr(t, "data", t.data.double()),
    }
    for name, change in changes.items():
        before = stamp(t, None, u)
        change()
        assert stamp(t, None, u) != before, name
    other = torch.rand(6)
    assert stamp(other, None, u) != stamp(t, None, u)
    with torch.inference_mode():
        made_there = torch.rand(6)
    assert stamp(made_there) is None
    assert stamp(t, made_there) is None

    class Sub(torch.Tensor):
        pass

    assert stamp(torch.rand(3).as_subclass(Sub)) is None
    del keep


@pytest.mark.skipif(not _backend.HAS_C, reason="needs the compiled extension")
def test_the_compiled_stamp_is_used():
    assert state_stamp.__module__ == "slimops.ops.state_stamp"
    stamp = state_stamp(torch.rand(2))
    assert isinstance(stamp, bytes)  # the compiled one (the Python one makes a tuple)
