"""Per-width latency of the demo CNN: slimops vs the reference style (slice + F.conv2d +
per-width BN) vs a dense network built at that width, in one run.

    pytest bench/ --benchmark-only --benchmark-group-by=group

The full per-layer / per-model suite (S-MobileNet, S-ResNet-50, frozen dense baselines)
is the benchmarks issue; this is its first entry.
"""

import pytest
import torch

import slimops
from slimops import _backend
from slimops.models import slim_cnn

WIDTHS = (0.25, 0.5, 0.75, 1.0)
INPUT = (1, 3, 64, 64)


def _dense_copy(width: float) -> torch.nn.Module:
    """The same architecture built at one width only (a plain single-width model)."""
    torch.manual_seed(0)
    return slim_cnn(widths=(1.0,), base=[slimops.channels(c, (width,), 8)[0] for c in (32, 64, 128)]).eval()


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
    net = _dense_copy(width) if variant == "dense" else model
    with torch.inference_mode(), slimops.width(model, width):
        benchmark(net, x)
