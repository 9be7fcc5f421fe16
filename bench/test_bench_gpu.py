"""GPU latency per width: the slimops ops on CUDA tensors (the Triton kernels of
``slimops.kernels``) beside the reference style and a dense network of the same width, in
the same run. Skipped cleanly where there is no CUDA GPU (every machine of this project:
these entries have never run here, and no GPU figure is claimed anywhere).

Per model (S-MobileNet v2, S-MobileNet v1), batch 1 and 32, float16 and float32, eval, and
per layer (the shapes of ``test_bench_layers``). Each timed call ends with
``torch.cuda.synchronize()``, so a round is the device time of a forward plus one sync.
"""

from functools import lru_cache

import pytest
import torch

import slimops
from baselines import dense_eager, reference_style
from benchutil import full, tag

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU here: the GPU benchmarks need one (this project's machines have none)",
)

MODELS = ("s_mobilenet_v2", "s_mobilenet_v1")
GPU_VARIANTS = ("slimops", "reference", "dense-eager")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
ROUNDS, WARMUP = 50, 10


@lru_cache(maxsize=None)
def _model(name: str, dtype_name: str):
    from slimops.models import MODELS as REGISTRY

    torch.manual_seed(0)
    model = REGISTRY[name]().eval().to("cuda", DTYPES[dtype_name])
    return model, reference_style(model)


def _runner(variant, model, reference, width):
    if variant == "slimops":
        net = model
        slimops.set_width(net, width)
    elif variant == "reference":
        net = reference
        slimops.set_width(net, width)
    else:
        net = dense_eager(model, width)

    def run(x):
        with torch.inference_mode():
            y = net(x)
        torch.cuda.synchronize()
        return y

    return run


@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", [1, full(32)])
@pytest.mark.parametrize("name", MODELS)
def test_gpu_model(benchmark, name, batch, dtype_name, variant):
    """The widest width (every width: ``test_gpu_model_width``)."""
    model, reference = _model(name, dtype_name)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=DTYPES[dtype_name])
    width = slimops.model_widths(model)[-1]
    run = _runner(variant, model, reference, width)
    tag(benchmark, "gpu-model", f"{name}-{dtype_name}", batch, width, variant)
    benchmark.pedantic(run, args=(x,), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)


@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("width_index", [0, 1, 2, 3])
@pytest.mark.parametrize("name", MODELS)
def test_gpu_model_width(benchmark, name, width_index, variant):
    """Every width at batch 1, float16: the per-width latency a deployment picks from."""
    model, reference = _model(name, "fp16")
    widths = slimops.model_widths(model)
    width = widths[min(width_index, len(widths) - 1)]
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.float16)
    run = _runner(variant, model, reference, width)
    tag(benchmark, "gpu-model", f"{name}-fp16", 1, width, variant)
    benchmark.pedantic(run, args=(x,), rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
