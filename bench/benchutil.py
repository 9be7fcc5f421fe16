"""What every benchmark module shares: the round policy, models built once, tagging.

Round policy: one untimed warm-up call, one timed call to estimate the cost, then
``benchmark.pedantic`` with ``rounds = clamp(budget_s / estimate, min_rounds, max_rounds)``
rounds of one call each (so a 50 us layer gets hundreds of rounds and ResNet-50 at batch 8 a
handful, and the whole suite stays within minutes on 2 cores). Reports use the median.

Every benchmark is tagged in ``extra_info`` with ``suite`` (``layer`` / ``model`` /
``train``), ``subject`` (layer or model name), ``batch``, ``width`` and ``variant``: the
report groups on those, not on test names.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Any, Callable, Dict

import pytest
import torch

from torch.profiler import ProfilerActivity, profile

from slimops.models import MODELS

# (budget_s, min_rounds, max_rounds) per suite; quick: a smoke run.
ROUNDS = {
    "layer": (0.5, 10, 400),
    "model": (1.5, 5, 100),
    "train": (6.0, 3, 10),
}
QUICK_ROUNDS = (0.05, 1, 3)


def full(value: Any) -> Any:
    """A parameter value only used in the full run (deselected by ``--bench-quick``)."""
    return pytest.param(value, marks=pytest.mark.full)


def tag(benchmark, suite: str, subject: str, batch: int, width: float, variant: str,
        **extra: Any) -> None:
    benchmark.group = (f"{suite} {subject} batch {batch} width {width:g}" if suite != "train"
                       else f"train {subject} batch {batch}")
    benchmark.extra_info.update(suite=suite, subject=subject, batch=batch, width=width,
                                variant=variant, **extra)


def measure(benchmark, fn: Callable[..., Any], *args: Any, suite: str, quick: bool) -> None:
    """Time ``fn(*args)`` with the round policy above."""
    budget, lo, hi = QUICK_ROUNDS if quick else ROUNDS[suite]
    fn(*args)  # warm-up: first-call allocations, oneDNN primitive creation, JIT profiling
    t0 = time.perf_counter()
    fn(*args)
    estimate = max(time.perf_counter() - t0, 1e-6)
    rounds = max(lo, min(hi, math.ceil(budget / estimate)))
    benchmark.extra_info["rounds"] = rounds
    benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=0)


@lru_cache(maxsize=None)
def eval_model(name: str, widths: tuple = ()) -> torch.nn.Module:
    """``MODELS[name]`` (default widths unless given), eval mode, seeded; built once per
    session and shared by all variants (the reference style shares its Parameters)."""
    torch.manual_seed(0)
    kwargs: Dict[str, Any] = {"widths": widths} if widths else {}
    return MODELS[name](**kwargs).eval()


@lru_cache(maxsize=None)
def reference_model(name: str, widths: tuple = ()) -> torch.nn.Module:
    from baselines import reference_style

    return reference_style(eval_model(name, widths))


def peak_step_bytes(step) -> int:
    """Peak live bytes of the tensors allocated while ``step()`` runs.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation (+bytes) and
    free (-bytes) of PyTorch's CPU allocator; summed in time order they give the live bytes
    of what the step allocated, whose maximum is returned. Blocks allocated before the step
    are not counted (their frees carry no size and are skipped), nor is memory that oneDNN or
    BLAS allocate outside PyTorch's allocator.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak
