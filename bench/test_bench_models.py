"""Per-model inference latency at every width: S-MobileNet v1, v2 and S-ResNet-50, eval,
3x224x224, batch 1 and 8; each width run four ways (``baselines.VARIANTS``): slimops, the
original implementation's style on the same weights, the dense network at that width in
eager PyTorch, and that network traced, frozen and optimized for inference (plus, with
``SLIMOPS_BENCH_COMPILE=1``, ``torch.compile`` of it).

    python -m slimops bench            (or: pytest bench/test_bench_models.py --benchmark-only)
"""

import inspect
import os

import pytest
import torch

from baselines import OPTIONAL_VARIANTS, VARIANTS, runner
from benchutil import eval_model, full, measure, reference_model, tag
from slimops.models import MODELS

IMAGE = (3, 224, 224)
# The paper's widths of each model: the builders' defaults.
SUBJECTS = ("s_mobilenet_v1", "s_mobilenet_v2", "s_resnet50")
# torch.compile of the dense network: opt-in (it compiles for tens of seconds per case).
COMPILE = os.environ.get("SLIMOPS_BENCH_COMPILE") == "1"


def _cases():
    for name in SUBJECTS:
        widths = inspect.signature(MODELS[name]).parameters["widths"].default
        for i, w in enumerate(widths):
            extreme = i in (0, len(widths) - 1)
            yield pytest.param(name, w, id=f"{name}-{w:g}",
                               marks=() if extreme else pytest.mark.full)


@pytest.mark.parametrize("variant", VARIANTS + (OPTIONAL_VARIANTS if COMPILE else ()))
@pytest.mark.parametrize("batch", [1, full(8)])
@pytest.mark.parametrize("name, width", list(_cases()))
def test_model(benchmark, name, width, batch, variant, quick):
    torch.manual_seed(0)
    x = torch.randn(batch, *IMAGE)
    model = eval_model(name)
    run = runner(variant, model, width, x, reference_model(name))
    tag(benchmark, "model", name, batch, width, variant)
    measure(benchmark, run, x, suite="model", quick=quick)
