"""What the slimops.train tests share: a tiny float64 CNN, batches, per-width gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimops.models import slim_cnn
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

