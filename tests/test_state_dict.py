"""A slimmable model's state_dict, saved once, restores every width in a fresh model."""

from __future__ import annotations

import io

import pytest
import torch

from slimops.models import MODELS
from slimops.width import model_widths, width as scoped_width


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_roundtrip_every_width(name, randomize_bn):
    """torch.save(model.state_dict()) loads strictly into a freshly built model, and the
    fresh model gives the same outputs at every width."""
    model = randomize_bn(MODELS[name]()).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = MODELS[name]().eval()
    fresh.load_state_dict(torch.load(buf), strict=True)
    x = torch.randn(1, 3, 64, 64)
    for w in model_widths(model):
        with torch.no_grad(), scoped_width(model, w), scoped_width(fresh, w):
            torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
