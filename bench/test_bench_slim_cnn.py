"""Per-width latency of the small slimmable CNN (slim_cnn, 1x3x64x64, eval): slimops vs the
reference style (slice + F.conv2d + per-width BN) vs the same architecture built densely at
that width in plain eager PyTorch, in one run.

    pytest bench/ --benchmark-only --benchmark-group-by=group

The full per-layer / per-model suite (S-MobileNet, S-ResNet-50, frozen dense baselines)
is the benchmarks issue; this is its first entry.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimops
from slimops import _backend
from slimops.models import slim_cnn

WIDTHS = (0.25, 0.5, 0.75, 1.0)
INPUT = (1, 3, 64, 64)


class _PlainBlock(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 with BN and ReLU6, plain torch.nn (as slim_cnn's block)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                nn.BatchNorm2d(cin), nn.ReLU6())
        self.pw_conv, self.pw_bn = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.pw_bn(self.pw_conv(self.dw(x)))
        return F.relu6(y + x if self.residual else y)


def _dense(width: float) -> nn.Module:
    """slim_cnn's architecture built at one width in plain eager PyTorch (nn.Conv2d,
    nn.BatchNorm2d): what a user would deploy without slimmable layers."""
    c = [slimops.channels(b, (width,), 8)[0] for b in (32, 64, 128)]
    return nn.Sequential(
        nn.Conv2d(3, c[0], 3, 1, 1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU6(),
        _PlainBlock(c[0], c[1], 2), _PlainBlock(c[1], c[2], 2), _PlainBlock(c[2], c[2], 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c[2], 10),
    ).eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return slim_cnn(widths=WIDTHS).eval()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("variant", ["slimops", "reference", "dense"])
def test_slim_cnn(benchmark, model, width, variant, monkeypatch):
    benchmark.group = f"slim_cnn width {width}"
    x = torch.randn(INPUT)
    if variant == "reference":
        monkeypatch.setattr(_backend, "HAS_C", False)
    net = _dense(width) if variant == "dense" else model
    with torch.inference_mode(), slimops.width(model, width):
        benchmark(net, x)
