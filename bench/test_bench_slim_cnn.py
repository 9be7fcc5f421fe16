"""Per-width latency of the small slimmable CNN (slim_cnn, 1x3x64x64, eval): slimops vs the
reference style (slice + F.conv2d + per-width BN, ``baselines.reference_style``) vs the same
architecture built densely at that width in eager PyTorch (``slimops.export``, BN kept) and
that dense network traced, frozen and optimized for inference, in one run.

    pytest bench/test_bench_slim_cnn.py --benchmark-only
"""

import pytest
import torch

from baselines import VARIANTS, runner
from benchutil import eval_model, full, measure, reference_model, tag

WIDTHS = (0.25, 0.5, 0.75, 1.0)
INPUT = (1, 3, 64, 64)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("width", [WIDTHS[0], full(WIDTHS[1]), full(WIDTHS[2]), WIDTHS[3]])
def test_slim_cnn(benchmark, width, variant, quick):
    torch.manual_seed(0)
    x = torch.randn(INPUT)
    model = eval_model("slim_cnn", WIDTHS)
    run = runner(variant, model, width, x, reference_model("slim_cnn", WIDTHS))
    tag(benchmark, "model", "slim_cnn", INPUT[0], width, variant, input=INPUT[-1])
    measure(benchmark, run, x, suite="layer", quick=quick)
