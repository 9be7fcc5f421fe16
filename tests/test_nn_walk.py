"""slimops.nn.map_layers: one walk over a model's slimmable layers, outermost first."""

import pytest
from torch import nn

from slimops.nn import SlimConvBNAct, SlimmableConv2d, SlimmableLinear, map_layers
from slimops.width import Slimmable


class Odd(Slimmable, nn.Module):
    """A slimmable layer of a kind no handler knows."""

    def __init__(self):
        super().__init__()
        self._init_widths((0.5, 1.0))


def _model():
    return nn.Sequential(SlimConvBNAct([2, 4], [2, 4], 3, widths=(0.5, 1.0)),
                         SlimmableConv2d([2, 4], [2, 4], 1, widths=(0.5, 1.0)),
                         nn.ReLU(), SlimmableLinear([2, 4], 3, widths=(0.5, 1.0)))


def test_outermost_first_and_insides_skipped():
    model = _model()
    seen = []
    out = map_layers(model, {SlimConvBNAct: lambda m: seen.append(m) or nn.Identity(),
                             SlimmableConv2d: lambda m: seen.append(m) or nn.Identity()})
    # the block's own conv is not visited on its own; the standalone conv is; no handler
    # for the linear layer: left alone
    assert seen == [model[0], model[1]]
    assert set(out) == {id(model[0]), id(model[1])}


def test_unknown_slimmable_layers():
    model = nn.Sequential(_model(), Odd())
    handlers = {SlimConvBNAct: lambda m: nn.Identity(), SlimmableConv2d: lambda m: nn.Identity(),
                SlimmableLinear: lambda m: nn.Identity()}
    assert len(map_layers(model, handlers)) == 3
    with pytest.raises(TypeError, match="no equivalent for the layer Odd"):
        map_layers(model, handlers, unknown="no equivalent for the layer")
