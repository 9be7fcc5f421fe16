"""Per-layer inference latency at every width, on S-MobileNet v1/v2 and ResNet-like shapes
at 224x224 input, batch 1, eval; the four variants of ``baselines.VARIANTS``.

==========  ====================================================  =========
layer       shape at 1.0x (channels at a width: MobileNet's rule)  input
==========  ====================================================  =========
stem        3x3 stride 2, 3 -> 32, BN, ReLU                        224x224
pointwise   1x1, 256 -> 256, BN, ReLU (v1, stride 8)               28x28
depthwise   3x3 depthwise, 128 channels, BN, ReLU (v1, stride 4)   56x56
dense3x3    3x3, 64 -> 64, BN, ReLU (ResNet stage 1; int(c * w))   56x56
linear      1024 -> 1000 (v1's classifier: outputs never slim)     1024
==========  ====================================================  =========
"""

from functools import lru_cache

import pytest
import torch

import slimops
from baselines import VARIANTS, reference_style, runner
from benchutil import full, measure, tag
from slimops.nn import SlimConvBNAct, SlimmableLinear

WIDTHS = (0.25, 0.5, 0.75, 1.0)


def _mb(c):
    return slimops.channels(c, WIDTHS, divisor=8)


# name -> (builder, input shape at width w as a function of the layer)
LAYERS = {
    "stem": lambda: SlimConvBNAct([3] * 4, _mb(32), 3, 2, widths=WIDTHS),
    "pointwise": lambda: SlimConvBNAct(_mb(256), _mb(256), 1, widths=WIDTHS),
    "depthwise": lambda: SlimConvBNAct(_mb(128), _mb(128), 3, groups=128, widths=WIDTHS),
    "dense3x3": lambda: SlimConvBNAct(slimops.channels(64, WIDTHS), slimops.channels(64, WIDTHS),
                                      3, widths=WIDTHS),
    "linear": lambda: SlimmableLinear(_mb(1024), [1000] * 4, widths=WIDTHS),
}
RESOLUTION = {"stem": 224, "pointwise": 28, "depthwise": 56, "dense3x3": 56}


@lru_cache(maxsize=None)
def _layer(name):
    torch.manual_seed(0)
    layer = LAYERS[name]().eval()
    return layer, reference_style(layer)


def _input(name, layer, width):
    with slimops.width(layer, width):
        if name == "linear":
            return torch.randn(1, layer.active_features()[0])
        cin = layer.conv.active_channels()[0]
    r = RESOLUTION[name]
    return torch.randn(1, cin, r, r)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("width", [WIDTHS[0], full(WIDTHS[1]), full(WIDTHS[2]), WIDTHS[3]])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer(benchmark, name, width, variant, quick):
    layer, reference = _layer(name)
    torch.manual_seed(0)
    x = _input(name, layer, width)
    run = runner(variant, layer, width, x, reference)
    tag(benchmark, "layer", name, 1, width, variant)
    measure(benchmark, run, x, suite="layer", quick=quick)
