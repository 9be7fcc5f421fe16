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


def _drop_width(state_dict, index):
    """The state_dict without every switchable BN's ``index``-th width."""
    return {k: v for k, v in state_dict.items() if f".bn.{index}." not in k}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_missing_width_bn_fails_naming_the_width(name):
    model = MODELS[name]()
    widest = model_widths(model)[-1]
    broken = _drop_width(model.state_dict(), len(model_widths(model)) - 1)
    with pytest.raises(RuntimeError, match=rf"no switchable batch norm for width\(s\) {widest:g} in"):
        MODELS[name]().load_state_dict(broken)


def test_missing_width_message_names_a_layer_and_the_way_out():
    model = MODELS["slim_cnn"]()
    sd = model.state_dict()
    del sd["stem.bn.bn.1.running_var"]  # one key of one width of one layer
    with pytest.raises(RuntimeError) as err:
        MODELS["slim_cnn"]().load_state_dict(sd)
    msg = str(err.value)
    w = model_widths(model)[1]
    assert f"width(s) {w:g} in 1 layer(s)" in msg and "'stem.bn'" in msg
    assert "calibrate_bn" in msg and "strict=False" in msg


def test_non_strict_load_warns_and_reports_the_keys():
    model = MODELS["slim_cnn"]()
    broken = _drop_width(model.state_dict(), 0)
    fresh = MODELS["slim_cnn"]()
    with pytest.warns(RuntimeWarning, match="no switchable batch norm for width"):
        result = fresh.load_state_dict(broken, strict=False)
    assert result.missing_keys and all(".bn.0." in k for k in result.missing_keys)


def test_missing_bn_widths_for_any_module():
    """The check works on a model built by hand from the layers (no mixin there)."""
    from slimops.nn import SlimConvBNAct, missing_bn_widths

    net = torch.nn.Sequential(SlimConvBNAct(3, [4, 8], 3, widths=[0.5, 1.0]))
    sd = net.state_dict()
    assert missing_bn_widths(net, sd) == {}
    assert missing_bn_widths(net, _drop_width(sd, 1)) == {"0.bn": [1.0]}
